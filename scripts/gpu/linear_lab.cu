// Variants of the decode products for scripts/gpu/linear_lab.py, compiled after csrc/fused_kernels.cu (whose
// templates they instantiate), and a plain read of the weight (the card's rate for that many bytes, the
// roof for the products). Run 57 also timed a cp.async version (each lane's runs copied into shared
// memory 2-7 stages ahead): slower than the register loads at every shape (docs/benchmarks.md).

// Every 16-byte vector of w once (4 loads in flight a thread), XORed so that the loads stay. (Not in the
// CPU emulator, which scripts/gpu/linear_lab_check.cpp runs the prototype below in.)
#ifndef MMREG_EMULATE
extern "C" __global__ void lab_read(const uint4* w, long long vectors, unsigned* sink) {
  unsigned acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[j] = i + j * stride < vectors ? w[i + j * stride] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
  }
  if (acc == 0x9e3779b9u) {
    sink[0] = acc;
  }
}
#endif

// A prototype for 17-32 rows of x where the warps split w's rows rather than k (run 77's linear_rows32,
// `00f27f3`, had all 8 warps of a block hold the sums of all its 64 rows of w × 32 of x: 64 accumulators
// a lane, which left registers for one chunk of loads a warp, and read at 0.8-1.4 TB/s on an H100,
// against cuBLAS's 2.3-2.7; docs/benchmarks.md). Here warp `warp` of block (part, split) owns the 16
// rows of w 128·part + 16·warp on (16 accumulators a lane for x's 32 rows) and walks the split's chunks
// of k kUnroll at a time: each chunk, lane (g, t) reads the 16-byte run at k = 32·chunk + 8·t of w's
// rows g and g + 8 and of x's rows 8j + g (j < 4). The block's 8 warps read the same runs of x, so all
// but the first come from L1. No sums to combine in the block; with k split (splits > 1), each warp
// stores its f32 sums in `partial`, and the last split to arrive at the block's rows (lab_arrivals,
// reset by it) adds every split's in order.
__device__ unsigned lab_arrivals[8192];

// f(sum, row of y, column of y) for each of lane's sums c that falls inside y (m × n): c[j] holds
// (w row first + g, x row 8j + 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1), with g = lane / 4 and
// t = lane % 4.
template <typename F>
__device__ __forceinline__ void lab_each_sum(const float (&c)[4][4], long long first, int lane, int m, long long n,
                                             F f) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const long long out = first + g + (q >= 2 ? 8 : 0);
      const int row = 8 * j + 2 * t + (q & 1);
      if (row < m && out < n) {
        f(c[j][q], row, out);
      }
    }
  }
}

template <int kUnroll>
__device__ void lab_rows32_w(u16* y, const u16* x, const u16* w, float* partial, int m, long long n, long long k,
                             int splits) {
  typedef FewRun<BF16>::T V;
  __shared__ unsigned last_shared;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int split = blockIdx.x % splits;
  const long long part = blockIdx.x / splits, first = 128 * part + 16 * warp;
  const long long chunks = (k + 31) / 32;
  const long long chunk_end = (split + 1) * chunks / splits;
  const u16* wa = w + min(first + g, n - 1) * k;
  const u16* wb = w + min(first + g + 8, n - 1) * k;
  const u16* xs[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    xs[j] = x + min(8 * j + g, m - 1) * k;
  }
  float c[4][4] = {};
  for (long long group = split * chunks / splits; group < chunk_end; group += kUnroll) {
    V av[kUnroll], bv[kUnroll], xv[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const long long at = (group + u) * 32 + t * 8;
      const bool real = group + u < chunk_end && at < k;
      av[u] = bv[u] = V{};
      if (real) {
        av[u] = *reinterpret_cast<const V*>(wa + at);
        bv[u] = *reinterpret_cast<const V*>(wb + at);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        xv[u][j] = V{};
        if (real) {
          xv[u][j] = *reinterpret_cast<const V*>(xs[j] + at);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const unsigned a[4] = {av[u].e[2 * h], bv[u].e[2 * h], av[u].e[2 * h + 1], bv[u].e[2 * h + 1]};
          const unsigned b[2] = {xv[u][j].e[2 * h], xv[u][j].e[2 * h + 1]};
          mma_m16n8k16<BF16>(c[j], a, b);
        }
      }
    }
  }
  if (splits > 1) {
    lab_each_sum(c, first, lane, m, n, [&](float sum, int row, long long out) {
      partial[(split * (long long)m + row) * n + out] = sum;
    });
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      last_shared = atomicAdd(&lab_arrivals[part], 1u) == (unsigned)splits - 1;
    }
    __syncthreads();
    if (!last_shared) {
      return;
    }
    __threadfence();
  }
  lab_each_sum(c, first, lane, m, n, [&](float sum, int row, long long out) {
    // Every split's sums in order (at most 4 splits: the loads go out together).
    float other[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      other[s] = s < splits && s != split ? __ldcg(&partial[(s * (long long)m + row) * n + out]) : 0.0f;
    }
    float total = 0.0f;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      total += s == split ? sum : other[s];
    }
    y[row * n + out] = BF16::store(total);
  });
  if (splits > 1 && threadIdx.x == 0) {
    lab_arrivals[part] = 0;
  }
}

// lab_rows32_w_u{U}_b{B}: kUnroll = U, registers capped for B blocks an SM; a grid of
// ceil(n / 128) × splits blocks (splits <= 4).
#define LAB_ROWS32_W(U, B)                                                                                \
  extern "C" __global__ void __launch_bounds__(256, B) lab_rows32_w_u##U##_b##B(                          \
      u16* y, const u16* x, const u16* w, float* partial, int m, long long n, long long k, int splits) {   \
    lab_rows32_w<U>(y, x, w, partial, m, n, k, splits);                                                   \
  }
LAB_ROWS32_W(3, 2)
LAB_ROWS32_W(4, 1)
LAB_ROWS32_W(8, 1)
