// Variants of the decode products for scripts/gpu/linear_lab.py, compiled after csrc/fused_kernels.cu (whose
// templates they instantiate), and a plain read of the weight (the card's rate for that many bytes, the
// roof for the products). Run 57 also timed a cp.async version (each lane's runs copied into shared
// memory 2-7 stages ahead): slower than the register loads at every shape (docs/benchmarks.md).

// Every 16-byte vector of w once (4 loads in flight a thread), XORed so that the loads stay. (Not in the
// CPU emulator, which scripts/gpu/linear_lab_check.cpp runs the prototypes below in.)
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

// f(f, j, q) for each accumulator c[f][j][q] of a lab_rows32 warp (kFrags tiles of 16 rows of w × the
// 4 tiles of 8 of x's rows × the mma's 4).
template <int kFrags, typename F>
__device__ __forceinline__ void each_accumulator(F&& f) {
#pragma unroll
  for (int fr = 0; fr < kFrags; ++fr) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        f(fr, j, q);
      }
    }
  }
}

// A product for 17 to 32 rows of x on the tensor cores (a prototype for batch 32, whose products cuBLAS
// reads at 2.5-3.9 TB/s: docs/benchmarks.md, run 76's section). y [m, n] = x [m, k] · w [n, k]ᵀ in bf16
// with f32 sums rounded once. A block takes kFrags × 16 rows of w at a time (grid-stride over such
// tiles); its 8 warps split k into chunks of 32 as the few-rows kernels do: in a chunk, lane (g, t) reads
// the 16-byte run at k = 32·chunk + 8·t of w's rows 16f + g and 16f + g + 8 (f < kFrags) and of x's rows
// 8j + g (j < 4: the four tiles of 8 of x's rows), kUnroll chunks at once. So x is read from L2 once per
// kFrags × 16 rows of w, where the 32-row few-rows kernels (run 73) read it for every 16. The warps'
// sums meet in shared memory in three halvings; warp 0 writes the tile.
template <int kFrags, int kUnroll>
__device__ void lab_rows32(u16* y, const u16* x, const u16* w, int m, long long n, long long k) {
  typedef FewRun<BF16>::T V;
  constexpr int kWarps = 8;
  __shared__ float sums[kWarps / 2][kFrags][4][4][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long long chunks = (k + 31) / 32, tile_rows = 16LL * kFrags;
  const long long tiles = (n + tile_rows - 1) / tile_rows;
  const u16* xs[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    xs[j] = x + min(8 * j + g, m - 1) * k;
  }
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const long long first = tile * tile_rows;
    float c[kFrags][4][4] = {};
    for (long long group = warp * (long long)kUnroll; group < chunks; group += (long long)kWarps * kUnroll) {
      V wv[kUnroll][kFrags][2], xv[kUnroll][4];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const long long at = (group + u) * 32 + t * 8;
#pragma unroll
        for (int f = 0; f < kFrags; ++f) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            wv[u][f][r] = V{};
            if (at < k) {
              wv[u][f][r] = *reinterpret_cast<const V*>(w + min(first + 16 * f + 8 * r + g, n - 1) * k + at);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          xv[u][j] = V{};
          if (at < k) {
            xv[u][j] = *reinterpret_cast<const V*>(xs[j] + at);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int f = 0; f < kFrags; ++f) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const unsigned a[4] = {wv[u][f][0].e[2 * h], wv[u][f][1].e[2 * h], wv[u][f][0].e[2 * h + 1],
                                     wv[u][f][1].e[2 * h + 1]};
              const unsigned b[2] = {xv[u][j].e[2 * h], xv[u][j].e[2 * h + 1]};
              mma_m16n8k16<BF16>(c[f][j], a, b);
            }
          }
        }
      }
    }
    // Warps [half, 2·half) hand their sums to warps [0, half), for half = 4, 2, 1.
#pragma unroll
    for (int half = kWarps / 2; half >= 1; half /= 2) {
      if (warp >= half && warp < 2 * half) {
        each_accumulator<kFrags>([&](int f, int j, int q) { sums[warp - half][f][j][q][lane] = c[f][j][q]; });
      }
      __syncthreads();
      if (warp < half) {
        each_accumulator<kFrags>([&](int f, int j, int q) { c[f][j][q] += sums[warp][f][j][q][lane]; });
      }
      __syncthreads();
    }
    // c[f][j] holds (w row 16f + g, x row 8j + 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
    if (warp == 0) {
      each_accumulator<kFrags>([&](int f, int j, int q) {
        const long long out = first + 16 * f + g + (q >= 2 ? 8 : 0);
        const int row = 8 * j + 2 * t + (q & 1);
        if (row < m && out < n) {
          y[row * n + out] = BF16::store(c[f][j][q]);
        }
      });
    }
  }
}

// lab_rows32_f{F}_u{U}: F × 16 rows of w a tile, U chunks of 32 a warp at once (the few-rows kernels'
// arguments; bias unused).
#define LAB_ROWS32(F, U)                                                                                  \
  extern "C" __global__ void __launch_bounds__(256, 1) lab_rows32_f##F##_u##U(                            \
      u16* y, const u16* x, const u16* w, const u16* /* bias */, int m, long long n, long long k) {       \
    lab_rows32<F, U>(y, x, w, m, n, k);                                                                   \
  }
LAB_ROWS32(2, 2)
LAB_ROWS32(4, 1)
LAB_ROWS32(4, 2)
LAB_ROWS32(6, 1)
