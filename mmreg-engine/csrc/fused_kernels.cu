// Fused elementwise kernels for the decoder layer, compiled at startup by NVRTC (see src/kernels.rs).
// Each kernel does in one pass what libtorch does in several, with the same roundings as HF's op-by-op
// code: every intermediate that HF stores in the model dtype is rounded to it here too, so the results
// equal the unfused ops (RMSNorm up to the order of its f32 sum).
//
// No headers: NVRTC compiles this alone. bf16 and f16 are handled as their bits. The same source also
// compiles as C++ for the CPU emulator that tests it where there is no GPU (csrc/kernel_emulator.cpp,
// which defines MMREG_EMULATE and the CUDA built-ins used here).

typedef unsigned short u16;

#ifndef MMREG_KERNEL
#define MMREG_KERNEL extern "C" __global__
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// kMma: the tensor cores' mma for the type (0: none, 1: bf16, 2: f16).
struct F32 {
  typedef float T;
  static constexpr int kMma = 0;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};

struct BF16 {
  typedef u16 T;
  static constexpr int kMma = 1;
  static __device__ __forceinline__ float load(u16 x) { return __uint_as_float(((unsigned)x) << 16); }
  // Round to nearest even, as torch's float -> bfloat16 conversion; NaN stays NaN.
  static __device__ __forceinline__ u16 store(float x) {
    unsigned bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
      return 0x7fc0;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (u16)(bits >> 16);
  }
};

struct F16 {
  typedef u16 T;
  static constexpr int kMma = 2;
#ifdef MMREG_EMULATE
  static float load(u16 x) { return (float)__builtin_bit_cast(_Float16, x); }
  static u16 store(float x) { return __builtin_bit_cast(u16, (_Float16)x); }
#else
  static __device__ __forceinline__ float load(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
  }
  static __device__ __forceinline__ u16 store(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
  }
#endif
};

// Programmatic dependent launch (sm_90 and later; nothing on older GPUs and in the emulator): the engine
// launches these kernels so that one may start while the kernel before it in the stream is finishing.
// begin_kernel() waits until the kernels before have finished and their writes are visible, then lets
// the next kernel's blocks be scheduled (so at most one kernel waits ahead). Every kernel calls it before
// it reads or writes memory that another kernel touches; the linear kernels first prefetch into L2 the
// first weights they will read, and the vectorised RMSNorm reads its weight (weights no kernel writes),
// which is the overlap this buys.
__device__ __forceinline__ void begin_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Early reads (MMREG_EARLY_READS, 1 by default; 0 in the environment keeps the later order, for
// measurements): kernels also read, before begin_kernel(), what kernels before the one just before them
// wrote. When a kernel's blocks start, the kernel just before has passed its own begin_kernel(), so every
// kernel before that one has finished and its writes are visible; only the kernel just before may still
// be writing. So: the residual add's stream (RMSNorm after an attention or MLP output), and a step's
// slots, lengths, cos and sin (written before its first layer), come off the path from the kernel before
// to this one. The rope epilogue of the few-rows kernels also reads its inputs before the tile's products
// rather than after its barrier. With the six-warp attention, +0.9% / +2.6% decode tokens/s at batch 1 /
// 8 on an H100 (docs/benchmarks.md, runs 72 and 74).
#ifndef MMREG_EARLY_READS
#define MMREG_EARLY_READS 1
#endif

__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef MMREG_EMULATE
  (void)p;
#else
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// Two 16-bit elements of a 32-bit word (bf16 or f16; the first in the low half, as the tensor cores
// read them), and the words made of the low or the high halves of two words.
template <typename D>
__device__ __forceinline__ float half_of(unsigned word, int e) {
  return D::load((u16)(word >> (16 * e)));
}

__device__ __forceinline__ unsigned low_halves(unsigned first, unsigned second) {
  return (first & 0xffffu) | (second << 16);
}

__device__ __forceinline__ unsigned high_halves(unsigned first, unsigned second) {
  return (first >> 16) | (second & 0xffff0000u);
}

// c += a · b on the tensor cores (mma.m16n8k16, bf16 or f16 with f32 sums) for the warp: A 16 × 16 and
// B 16 × 8 in PTX's fragment layout, with lane l = 4g + t holding a = (A[g][2t..2t+1], A[g+8][2t..2t+1],
// A[g][2t+8..2t+9], A[g+8][2t+8..2t+9]), b = (B[2t..2t+1][g], B[2t+8..2t+9][g]) and c = (C[g][2t],
// C[g][2t+1], C[g+8][2t], C[g+8][2t+1]). The emulator gathers every lane's fragments and sums the lane's
// products itself.
template <typename D>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#ifndef MMREG_EMULATE
  static_assert(D::kMma != 0, "no mma for f32");
  if constexpr (D::kMma == 1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  const unsigned mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  unsigned lanes[32][6];
  mmreg_emulator::warp_gather(mine, lanes);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // Lane 4g + s holds rows g and g + 8 of A at k = 2s, 2s + 1 (words 0, 1) and 2s + 8, 2s + 9 (words
  // 2, 3); lane 4n + s column n of B at the same k (words 4 and 5).
  for (int s = 0; s < 4; ++s) {
    const unsigned* row = lanes[4 * g + s];
    const unsigned* column0 = lanes[8 * t + s];
    const unsigned* column1 = lanes[8 * t + 4 + s];
    for (int h = 0; h < 2; ++h) {
      for (int e = 0; e < 2; ++e) {
        const float x0 = half_of<D>(row[2 * h], e), x8 = half_of<D>(row[2 * h + 1], e);
        const float y0 = half_of<D>(column0[4 + h], e), y1 = half_of<D>(column1[4 + h], e);
        c[0] += x0 * y0;
        c[1] += x0 * y1;
        c[2] += x8 * y0;
        c[3] += x8 * y1;
      }
    }
  }
#endif
}

// x rounded to the storage type and back: what HF gets when an op writes a tensor of the model dtype.
template <typename D>
__device__ __forceinline__ float round_to(float x) {
  return D::load(D::store(x));
}

// Sum and maximum, for block_reduce.
struct Sum {
  static __device__ __forceinline__ float identity() { return 0.0f; }
  static __device__ __forceinline__ float apply(float a, float b) { return a + b; }
};
struct Max {
  static __device__ __forceinline__ float identity() { return -INFINITY; }
  static __device__ __forceinline__ float apply(float a, float b) { return fmaxf(a, b); }
};

// Op over the block (blockDim.x a multiple of 32, at most 1024). Each Op has its own partials, so a
// block can take a maximum and then a sum without a barrier between them.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v) {
  __shared__ float partial[32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    partial[warp] = v;
  }
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? partial[lane] : Op::identity();
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce<Sum>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<Max>(v); }

// One block per row. HF's LlamaRMSNorm: y = x * rsqrt(mean(x²) + eps) in f32, rounded to the model
// dtype, then weight * y in the model dtype. With `delta`, the row is first x + delta (the residual add,
// rounded, and written to `sum`).
template <typename D>
__device__ void rms_norm_row(typename D::T* out, typename D::T* sum, const typename D::T* x,
                             const typename D::T* delta, const typename D::T* weight, int cols,
                             float eps) {
  const long long row = blockIdx.x;
  x += row * cols;
  out += row * cols;
  if (delta != nullptr) {
    delta += row * cols;
    sum += row * cols;
  }
  float squares = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float v = D::load(x[c]);
    if (delta != nullptr) {
      const typename D::T s = D::store(v + D::load(delta[c]));
      sum[c] = s;
      v = D::load(s);
    }
    squares += v * v;
  }
  const float inv = rsqrtf(block_sum(squares) / cols + eps);
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    // The thread reads back what it wrote itself.
    const float v = D::load(delta != nullptr ? sum[c] : x[c]);
    out[c] = D::store(D::load(weight[c]) * round_to<D>(v * inv));
  }
}

// N elements of the storage type in one aligned vector: read and written by single 4-, 8- or 16-byte
// accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T e[N];
};

// The residual add of one 16-byte vector of a row: `a` plus `delta`'s vector at `at`, rounded to the
// dtype as a separate add would be and written to `sum` at `at`; `v` gets the sum's elements in f32.
template <typename D, typename V, int N>
__device__ __forceinline__ void add_residual_vector(float (&v)[N], const V& a, const typename D::T* delta,
                                                    typename D::T* sum, long long at) {
  const V b = *reinterpret_cast<const V*>(delta + at);
  V s;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    s.e[n] = D::store(D::load(a.e[n]) + D::load(b.e[n]));
    v[n] = D::load(s.e[n]);
  }
  *reinterpret_cast<V*>(sum + at) = s;
}

// rms_norm_row for rows read once into registers in 16-byte vectors, each thread holding up to
// kNormVectors of them: one block of up to 1024 threads per row, which at a decode step's few rows keeps
// the latency to one read, one block sum and one write. The caller checks that cols is a multiple of
// the vector's elements, that a row fits (cols <= blockDim.x * kNormVectors * vector) and that every
// pointer is 16-byte aligned.
constexpr int kNormVectors = 4;

template <typename D>
__device__ void rms_norm_row_vectors(typename D::T* out, typename D::T* sum, const typename D::T* x,
                                     const typename D::T* delta, const typename D::T* weight, int cols,
                                     float eps) {
  constexpr int N = 16 / sizeof(typename D::T);
  typedef Pack<typename D::T, N> V;
  const long long row = blockIdx.x;
  // The weight (which no kernel writes) is read before waiting for the kernel before: one read of L2
  // off the path from its output to this one's.
  V w[kNormVectors], early[kNormVectors];
#pragma unroll
  for (int i = 0; i < kNormVectors; ++i) {
    const long long c = (threadIdx.x + i * (long long)blockDim.x) * N;
    if (c < cols) {
      w[i] = *reinterpret_cast<const V*>(weight + c);
      // The residual stream, which the kernel before does not write (MMREG_EARLY_READS).
      if (MMREG_EARLY_READS != 0 && delta != nullptr) {
        early[i] = *reinterpret_cast<const V*>(x + row * cols + c);
      }
    }
  }
  begin_kernel();
  float v[kNormVectors][N];
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < kNormVectors; ++i) {
    const long long c = (threadIdx.x + i * (long long)blockDim.x) * N;
    if (c < cols) {
      const V a = MMREG_EARLY_READS != 0 && delta != nullptr
                      ? early[i]
                      : *reinterpret_cast<const V*>(x + row * cols + c);
      if (delta != nullptr) {
        add_residual_vector<D>(v[i], a, delta, sum, row * cols + c);
      } else {
#pragma unroll
        for (int n = 0; n < N; ++n) {
          v[i][n] = D::load(a.e[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < N; ++n) {
        squares += v[i][n] * v[i][n];
      }
    }
  }
  const float inv = rsqrtf(block_sum(squares) / cols + eps);
#pragma unroll
  for (int i = 0; i < kNormVectors; ++i) {
    const long long c = (threadIdx.x + i * (long long)blockDim.x) * N;
    if (c < cols) {
      V o;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        o.e[n] = D::store(D::load(w[i].e[n]) * round_to<D>(v[i][n] * inv));
      }
      *reinterpret_cast<V*>(out + row * cols + c) = o;
    }
  }
}

// HF's nn.LayerNorm of each row of x + delta (the residual add before the norm, rounded to the dtype
// and written to `sum`), as libtorch computes it: mean and variance in f32 (here in two passes over the
// row held in registers), then (v - mean) * rsqrt(var + eps) * weight + bias in f32, rounded once. One
// block per row, each thread up to kNormVectors 16-byte vectors of it; the caller checks that cols is a
// multiple of the vector's elements, that a row fits and that every pointer is 16-byte aligned.
template <typename D>
__device__ void add_layer_norm_row_vectors(typename D::T* out, typename D::T* sum,
                                           const typename D::T* x, const typename D::T* delta,
                                           const typename D::T* weight, const typename D::T* bias,
                                           int cols, float eps) {
  constexpr int N = 16 / sizeof(typename D::T);
  typedef Pack<typename D::T, N> V;
  const long long row = blockIdx.x;
  float v[kNormVectors][N];
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < kNormVectors; ++i) {
    const long long c = (threadIdx.x + i * (long long)blockDim.x) * N;
    if (c < cols) {
      const V a = *reinterpret_cast<const V*>(x + row * cols + c);
      add_residual_vector<D>(v[i], a, delta, sum, row * cols + c);
#pragma unroll
      for (int n = 0; n < N; ++n) {
        total += v[i][n];
      }
    }
  }
  const float mean = block_sum(total) / cols;
  // block_sum's partials are reused by the second sum: every warp has read the first's before any
  // writes the second's.
  __syncthreads();
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < kNormVectors; ++i) {
    const long long c = (threadIdx.x + i * (long long)blockDim.x) * N;
    if (c < cols) {
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const float centred = v[i][n] - mean;
        squares += centred * centred;
      }
    }
  }
  const float inv = rsqrtf(block_sum(squares) / cols + eps);
#pragma unroll
  for (int i = 0; i < kNormVectors; ++i) {
    const long long c = (threadIdx.x + i * (long long)blockDim.x) * N;
    if (c < cols) {
      const V w = *reinterpret_cast<const V*>(weight + c);
      const V b = *reinterpret_cast<const V*>(bias + c);
      V o;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        o.e[n] = D::store((v[i][n] - mean) * inv * D::load(w.e[n]) + D::load(b.e[n]));
      }
      *reinterpret_cast<V*>(out + row * cols + c) = o;
    }
  }
}

// x / (1 + exp(-y)) in f32, as libtorch's sigmoid and SiLU compute it (expf and an IEEE division: the
// special function unit's fast exp and division, tried as MMREG_FAST_ACTIVATIONS, gained nothing in
// runs 72, 73 and 84).
__device__ __forceinline__ float over_one_plus_exp(float x, float y) { return x / (1.0f + expf(-y)); }

// silu(gate) * up of one element, HF's act_fn(gate) * up: silu's result rounded before the product.
template <typename D>
__device__ __forceinline__ typename D::T silu_times(typename D::T gate, typename D::T up) {
  const float g = D::load(gate);
  return D::store(round_to<D>(over_one_plus_exp(g, g)) * D::load(up));
}

// silu_times over a stacked [rows, 2 * cols] projection (gate first). Grid-stride loops over rows (y)
// and columns (x): no per-element division.
template <typename D>
__device__ void silu_mul_all(typename D::T* out, const typename D::T* gate_up, long long rows,
                             long long cols) {
  for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
    const typename D::T* gate = gate_up + r * 2 * cols;
    const typename D::T* up = gate + cols;
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < cols;
         c += (long long)gridDim.x * blockDim.x) {
      out[r * cols + c] = silu_times<D>(gate[c], up[c]);
    }
  }
}

// silu_mul_all in 16-byte vectors: a thread per vector of the output (and the matching ones of gate and
// up), over one flat index of every row's vectors, so that no block idles past a row's end (LLaVA's 1376
// vectors a row filled six blocks of 256 threads, the last with 96) and a prefill's many rows take a few
// wide loads per thread rather than one narrow load per element: 5-6% faster alone than a grid of rows
// (docs/benchmarks.md, run 107). The caller checks that cols is a multiple of the vector's elements, that
// both tensors are 16-byte aligned and that rows * cols / N fits 31 bits.
template <typename D>
__device__ void silu_mul_vectors(typename D::T* out, const typename D::T* gate_up, long long rows,
                                 long long cols) {
  constexpr int N = 16 / sizeof(typename D::T);
  typedef Pack<typename D::T, N> V;
  const unsigned per_row = (unsigned)(cols / N), total = (unsigned)rows * per_row;
  for (unsigned v = blockIdx.x * blockDim.x + threadIdx.x; v < total; v += gridDim.x * blockDim.x) {
    const unsigned r = v / per_row, c = v - r * per_row;
    const typename D::T* gate = gate_up + (long long)r * 2 * cols + (long long)c * N;
    const V g = *reinterpret_cast<const V*>(gate);
    const V u = *reinterpret_cast<const V*>(gate + cols);
    V o;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      o.e[n] = silu_times<D>(g.e[n], u.e[n]);
    }
    *reinterpret_cast<V*>(out + (long long)v * N) = o;
  }
}

// HF's quick_gelu (CLIP's activation), x * sigmoid(1.702 * x), rounded to the dtype after each of its
// three libtorch ops; sigmoid as libtorch computes it, 1 / (1 + exp(-x)) in f32.
template <typename D>
__device__ __forceinline__ typename D::T quick_gelu_of(typename D::T x) {
  const float v = D::load(x);
  const float scaled = round_to<D>(v * 1.702f);
  return D::store(v * round_to<D>(over_one_plus_exp(1.0f, scaled)));
}

// quick_gelu_of over n elements: a grid-stride loop, a thread per element.
template <typename D>
__device__ void quick_gelu_all(typename D::T* out, const typename D::T* x, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    out[i] = quick_gelu_of<D>(x[i]);
  }
}

// quick_gelu_all in 16-byte vectors, a thread per vector (`vectors` of them). The caller checks that
// both tensors are 16-byte aligned and their size a multiple of the vector's elements.
template <typename D>
__device__ void quick_gelu_vectors(typename D::T* out, const typename D::T* x, long long vectors) {
  constexpr int N = 16 / sizeof(typename D::T);
  typedef Pack<typename D::T, N> V;
  for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < vectors;
       v += (long long)gridDim.x * blockDim.x) {
    const V in = *reinterpret_cast<const V*>(x + v * N);
    V o;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      o.e[n] = quick_gelu_of<D>(in.e[n]);
    }
    *reinterpret_cast<V*>(out + v * N) = o;
  }
}

// Whether element `i` of value `v` comes before the best so far (`best` at `at`) in torch.argmax's
// order: the largest value, NaN above every number, and of equals the first index.
__device__ __forceinline__ bool argmax_before(float v, int i, float best, int at) {
  const bool v_nan = v != v, best_nan = best != best;
  if (v_nan || best_nan) {
    return v_nan && (!best_nan || i < at);
  }
  return v > best || (v == best && i < at);
}

// The warp's best of its lanes' (best, at), in every lane.
__device__ __forceinline__ void argmax_warp(float& best, int& at) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_at = __shfl_xor_sync(0xffffffffu, at, offset);
    if (argmax_before(other, other_at, best, at)) {
      best = other;
      at = other_at;
    }
  }
}

// torch.argmax over each row of `x` ([rows, cols]), one block a row: out[row] the first index of the
// row's largest element (NaN the largest). libtorch's reduction takes 12-13 µs for a decode step's
// logits (docs/benchmarks.md, run 109), one block reading the row in 16-byte vectors a few µs. With
// `vectorized`, the caller checks that x is 16-byte aligned and cols a multiple of the vector's elements.
template <typename D>
__device__ void argmax_row(long long* out, const typename D::T* x, int cols, bool vectorized) {
  constexpr int N = 16 / sizeof(typename D::T);
  typedef Pack<typename D::T, N> V;
  const typename D::T* row = x + (long long)blockIdx.x * cols;
  // `cols` with -inf: no element yet (any element of the row comes before it).
  float best = -INFINITY;
  int at = cols;
  if (vectorized) {
#pragma unroll 4
    for (int v = threadIdx.x; v < cols / N; v += blockDim.x) {
      const V in = *reinterpret_cast<const V*>(row + (long long)v * N);
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const float e = D::load(in.e[n]);
        if (argmax_before(e, v * N + n, best, at)) {
          best = e;
          at = v * N + n;
        }
      }
    }
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
      const float e = D::load(row[i]);
      if (argmax_before(e, i, best, at)) {
        best = e;
        at = i;
      }
    }
  }
  // The warp's best, then the block's (each warp's in shared memory).
  argmax_warp(best, at);
  __shared__ float warp_best[32];
  __shared__ int warp_at[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_at[warp] = at;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    best = lane < warps ? warp_best[lane] : -INFINITY;
    at = lane < warps ? warp_at[lane] : cols;
    argmax_warp(best, at);
    if (lane == 0) {
      // A row of no elements (cols 0) has no argmax; the caller never launches one.
      out[blockIdx.x] = at;
    }
  }
}

// One rotated pair (x[j], x[j + dim/2]) with its cos and sin at j and j + dim/2, rounded as HF's
// x * cos + rotate_half(x) * sin (rotate_half(x) = (-second, first)).
template <typename D>
__device__ __forceinline__ void rotate_pair(typename D::T& low, typename D::T& high, typename D::T c_low,
                                            typename D::T c_high, typename D::T s_low,
                                            typename D::T s_high) {
  const float first = D::load(low), second = D::load(high);
  low = D::store(round_to<D>(first * D::load(c_low)) + round_to<D>(-second * D::load(s_low)));
  high = D::store(round_to<D>(second * D::load(c_high)) + round_to<D>(first * D::load(s_high)));
}

// Where head `head` of token `t`'s row goes in the KV cache, or null: for the last 2 * kv_heads heads
// (keys, then values) when there are caches.
template <typename D>
__device__ __forceinline__ typename D::T* cache_row(typename D::T* key_cache, typename D::T* value_cache,
                                                    const long long* slots, long long t, int head,
                                                    int heads, int kv_heads, int dim) {
  const int first_key = heads - 2 * kv_heads, first_value = heads - kv_heads;
  if (key_cache == nullptr || head < first_key) {
    return nullptr;
  }
  typename D::T* cache = head < first_value ? key_cache : value_cache;
  const int kv_head = head < first_value ? head - first_key : head - first_value;
  return cache + (slots[t] * kv_heads + kv_head) * dim;
}

// Rotary embedding of the stacked [tokens, heads, dim] q/k/v projection: the first `rotated` heads
// (queries and keys) become x * cos + rotate_half(x) * sin, each product rounded as in HF; the rest
// (values) are copied. cos and sin are [tokens, dim] in the model dtype. Each thread takes a pair of
// elements j and j + dim/2 (which rotate into each other) of a row (token, head): grid-stride loops
// over rows (y) and pairs (x).
//
// With caches (not null), the last 2 * kv_heads heads are the keys and the values: their rows are also
// stored at the token's slot, `key_cache`/`value_cache` being [slots, kv_heads, dim] (the KV-cache write
// of the step, in the same pass). `out` has `slack` more rows after the tokens', which become zeros (an
// attention over a padded length reads them).
template <typename D>
__device__ void rope_all(typename D::T* out, const typename D::T* qkv, const typename D::T* cos,
                         const typename D::T* sin, long long tokens, int heads, int rotated, int dim,
                         typename D::T* key_cache, typename D::T* value_cache, const long long* slots,
                         int kv_heads, long long slack) {
  const int half = dim / 2;
  for (long long row = tokens * heads + blockIdx.y; row < (tokens + slack) * heads; row += gridDim.y) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < dim; j += gridDim.x * blockDim.x) {
      out[row * dim + j] = D::store(0.0f);
    }
  }
  for (long long row = blockIdx.y; row < tokens * heads; row += gridDim.y) {
    const long long t = row / heads;
    const int head = row % heads;
    const typename D::T* x = qkv + row * dim;
    typename D::T* y = out + row * dim;
    typename D::T* stored =
        cache_row<D>(key_cache, value_cache, slots, t, head, heads, kv_heads, dim);
    const typename D::T* c = cos + t * dim;
    const typename D::T* s = sin + t * dim;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < half; j += gridDim.x * blockDim.x) {
      typename D::T low = x[j], high = x[j + half];
      if (head < rotated) {
        rotate_pair<D>(low, high, c[j], c[j + half], s[j], s[j + half]);
      }
      y[j] = low;
      y[j + half] = high;
      if (stored != nullptr) {
        stored[j] = low;
        stored[j + half] = high;
      }
    }
  }
}

// rope_all in 16-byte vectors: a thread takes a run of N elements j .. j + N - 1 of a row's first half
// and the matching run of its second half, with the same roundings: grid-stride loops over tokens (y)
// and over the (head, run) pairs of a token (x), so that a thread finds its head with one 32-bit division
// (64-bit divisions per element had cost more than the rotation). The caller checks that dim / 2 is a
// multiple of N and that every tensor is 16-byte aligned. The `slack` rows after the tokens' become zeros.
template <typename D>
__device__ void rope_vectors(typename D::T* out, const typename D::T* qkv, const typename D::T* cos,
                             const typename D::T* sin, long long tokens, int heads, int rotated, int dim,
                             typename D::T* key_cache, typename D::T* value_cache, const long long* slots,
                             int kv_heads, long long slack) {
  constexpr int N = 16 / sizeof(typename D::T);
  typedef Pack<typename D::T, N> V;
  const int half = dim / 2, runs = half / N, per_token = heads * runs;
  V zero;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    zero.e[n] = D::store(0.0f);
  }
  for (long long t = tokens + blockIdx.y; t < tokens + slack; t += gridDim.y) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < per_token; i += gridDim.x * blockDim.x) {
      const int head = i / runs;
      const int j = (i - head * runs) * N;
      const long long row = t * heads + head;
      *reinterpret_cast<V*>(out + row * dim + j) = zero;
      *reinterpret_cast<V*>(out + row * dim + j + half) = zero;
    }
  }
  for (long long t = blockIdx.y; t < tokens; t += gridDim.y) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < per_token; i += gridDim.x * blockDim.x) {
      const int head = i / runs;
      const int j = (i - head * runs) * N;
      const long long row = t * heads + head;
      V low = *reinterpret_cast<const V*>(qkv + row * dim + j);
      V high = *reinterpret_cast<const V*>(qkv + row * dim + j + half);
      if (head < rotated) {
        const V c_low = *reinterpret_cast<const V*>(cos + t * dim + j);
        const V c_high = *reinterpret_cast<const V*>(cos + t * dim + j + half);
        const V s_low = *reinterpret_cast<const V*>(sin + t * dim + j);
        const V s_high = *reinterpret_cast<const V*>(sin + t * dim + j + half);
#pragma unroll
        for (int n = 0; n < N; ++n) {
          rotate_pair<D>(low.e[n], high.e[n], c_low.e[n], c_high.e[n], s_low.e[n], s_high.e[n]);
        }
      }
      *reinterpret_cast<V*>(out + row * dim + j) = low;
      *reinterpret_cast<V*>(out + row * dim + j + half) = high;
      typename D::T* stored =
          cache_row<D>(key_cache, value_cache, slots, t, head, heads, kv_heads, dim);
      if (stored != nullptr) {
        *reinterpret_cast<V*>(stored + j) = low;
        *reinterpret_cast<V*>(stored + j + half) = high;
      }
    }
  }
}

// Decode attention over the paged KV cache, reading each sequence's keys and values where they are (no
// gathered copy), split across blocks as flash-decoding does so that a few sequences still fill the
// GPU. Block (blockIdx.x, blockIdx.y) takes key/value head blockIdx.x % kv_heads of sequence blockIdx.x /
// kv_heads, and the blockIdx.y-th of gridDim.y equal chunks of its padded slot list (`slot_stride`
// entries, `lengths[seq]` of them real: `slots[seq * slot_stride + p]`).
//
// A position's row of a head is read by R lanes (R = 8, 16 or 32 for heads of up to 64, 128 or 256
// elements), each holding kRun = 8 consecutive elements (one 16-byte load in bf16; lanes past the end
// hold none), so one load instruction of the warp reads 32 / R positions. Each of the block's kWarps
// warps takes tiles of kTile consecutive positions: the warp's lanes fetch the tile's slot indices in
// one coalesced load (the next tile's while this one is read), every key and value load of the tile is
// issued before any is used, and an online softmax in f32 runs for each of the head's `group` query
// heads (grouped-query attention: they share each read; G, the most the variant holds, is 1, 4 or 8).
// Loops run to compile-time bounds, so the per-lane arrays stay in registers.
//
// With one chunk (gridDim.y == 1) the block writes the output, [sequences, heads, dim]. With more, it
// writes its unnormalised partial sums, f32 [sequences * heads, chunks, dim], their maximum and sum
// [sequences * heads, chunks], and paged_decode_combine reduces the chunks. q is [sequences, heads, dim]
// with `q_stride` elements between sequences; caches are [slots, kv_heads, dim]. kVector (the kernels'
// `vectorized`): dim is a multiple of kRun and the caches are aligned to kRun elements (each lane's run
// one vector load). group * dim at most kMaxGroupDim (the caller checks). Launched with kWarps * 32
// threads.
constexpr int kWarps = 4;
// The tensor-core kernel's wide variant: 6 warps a block, 2 blocks an SM at its 168 registers (12 warps,
// as 3 blocks of 4), for steps whose (sequence, head) pairs fit the device's blocks unsplit but leave
// blocks of 4 warps at 2 an SM (LLaVA-1.5's batch 8: 256 pairs).
constexpr int kWideWarps = 6;
constexpr int kMaxGroupDim = 1024;  // group * dim
constexpr int kRun = 8;

// Key (and value) loads in flight per lane in a tile: 8 vectors of 16 bytes, 4 with 8 query heads (their
// sums take the registers) and half as many for f32. kTile = kLoads * 32 / R positions, at most 32.
template <typename T, int G>
struct AttentionTile {
  static constexpr int kLoads = (G == 8 ? 4 : 8) * 2 / (int)sizeof(T);
};

// kRun elements at p, `count` of them real (0 past the end). Vectorized (kVector: p aligned to a run),
// one predicated vector load that leaves the register as it is in every case, so that the loads of a
// tile can all be in flight before the first is used; else element by element.
template <typename D, bool kVector>
__device__ __forceinline__ Pack<typename D::T, kRun> load_run(const typename D::T* p, int count) {
  typedef Pack<typename D::T, kRun> V;
  V v;
  if (kVector) {
#pragma unroll
    for (int e = 0; e < kRun; ++e) {
      v.e[e] = typename D::T(0);
    }
    if (count == kRun) {
      v = *reinterpret_cast<const V*>(p);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kRun; ++e) {
      v.e[e] = e < count ? p[e] : typename D::T(0);
    }
  }
  return v;
}

// The W warps' partial results, combined at the end of a block (one per kernel, shared by its two paths).
template <int G, int W = kWarps>
struct AttentionShared {
  float max[W][G];
  float sum[W][G];
  float acc[W][kMaxGroupDim];
};

// The block's warps' partial results (in `shared`, after a barrier) combined into the block's output:
// with one chunk (gridDim.y == 1) the attention of the group's heads, else the chunk's unnormalised sums
// with their maximum and sum for paged_decode_combine. Each thread takes some (head, element) pairs; a
// warp that saw no position has a sum of 0 and is skipped, and a chunk with no position at all writes a
// sum of 0 (an output of 0).
template <typename D, int G, int W = kWarps>
__device__ void combine_warps(const AttentionShared<G, W>& shared, typename D::T* out, float* partial_acc,
                              float* partial_max, float* partial_sum, int seq, int kv_head, int group,
                              int heads, int dim) {
  const int splits = gridDim.y;
  for (int i = threadIdx.x; i < group * dim; i += blockDim.x) {
    const int g = i / dim;
    float total_max = -INFINITY;
    for (int w = 0; w < W; ++w) {
      if (shared.sum[w][g] > 0.0f) {
        total_max = fmaxf(total_max, shared.max[w][g]);
      }
    }
    float total_sum = 0.0f, total = 0.0f;
    for (int w = 0; w < W; ++w) {
      if (shared.sum[w][g] > 0.0f) {
        const float factor = expf(shared.max[w][g] - total_max);
        total_sum += shared.sum[w][g] * factor;
        total += shared.acc[w][i] * factor;
      }
    }
    const long long head_row = (long long)seq * heads + kv_head * group + g;
    if (splits == 1) {
      out[head_row * dim + (i % dim)] = D::store(total_sum > 0.0f ? total / total_sum : 0.0f);
    } else {
      const long long part = head_row * splits + blockIdx.y;
      partial_acc[part * dim + (i % dim)] = total;
      if (i % dim == 0) {
        partial_max[part] = total_max;
        partial_sum[part] = total_sum;
      }
    }
  }
}

template <typename D, int R, int G, bool kVector>
__device__ void paged_decode_attention_chunk(AttentionShared<G>& shared, typename D::T* out,
                                             float* partial_acc, float* partial_max, float* partial_sum,
                                             const typename D::T* q, long long q_stride, const typename D::T* key_cache,
                                             const typename D::T* value_cache, const long long* slots,
                                             long long slot_stride, const long long* lengths, int heads,
                                             int kv_heads, int dim, float scale) {
  typedef Pack<typename D::T, kRun> V;
  constexpr int P = 32 / R;  // positions per load instruction
  constexpr int kLoads = AttentionTile<typename D::T, G>::kLoads;
  constexpr int kTile = kLoads * P;
  const int seq = blockIdx.x / kv_heads, kv_head = blockIdx.x % kv_heads;
  const int group = heads / kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // The lane's elements of a row, and which of a load's P positions it reads.
  const int first = (lane % R) * kRun, count = first >= dim ? 0 : min(kRun, dim - first);
  const int sub = lane / R;
  const long long chunk = (slot_stride + gridDim.y - 1) / gridDim.y;
  const long long begin = blockIdx.y * chunk;
  const long long end = min(lengths[seq], begin + chunk);
  const long long* seq_slots = slots + seq * slot_stride;

  float query[G][kRun];
  float acc[G][kRun];
  float running_max[G], running_sum[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const typename D::T* row = q + seq * q_stride + (long long)(kv_head * group + g) * dim + first;
#pragma unroll
    for (int e = 0; e < kRun; ++e) {
      query[g][e] = g < group && e < count ? D::load(row[e]) : 0.0f;
      acc[g][e] = 0.0f;
    }
    running_max[g] = -INFINITY;
    running_sum[g] = 0.0f;
  }
  // Lane l holds the slot of position p0 + l of the tile at p0 (0 past the tile or the end: unread).
  long long p0 = begin + warp * kTile;
  long long slot = lane < kTile && p0 + lane < end ? seq_slots[p0 + lane] : 0;
  // p0 < end, so the tile's first position is real (the same for the whole warp, as every branch with a
  // shuffle below: the shuffles see all 32 lanes).
  for (; p0 < end; p0 += kWarps * kTile) {
    const long long next = p0 + kWarps * kTile;
    const long long next_slot = lane < kTile && next + lane < end ? seq_slots[next + lane] : 0;
    V key[kLoads], value[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int u = i * P + sub;  // this lane's position of load i, in the tile
      const long long s = __shfl_sync(0xffffffffu, slot, u);
      const int real = p0 + u < end ? count : 0;
      const long long offset = (s * kv_heads + kv_head) * dim + first;
      key[i] = load_run<D, kVector>(key_cache + offset, real);
      value[i] = load_run<D, kVector>(value_cache + offset, real);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g < group) {
        float score[kLoads];
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
          score[i] = 0.0f;
#pragma unroll
          for (int e = 0; e < kRun; ++e) {
            score[i] += query[g][e] * D::load(key[i].e[e]);
          }
        }
        // Sums over a position's R lanes, then the tile's maximum over the warp.
#pragma unroll
        for (int o = R / 2; o > 0; o >>= 1) {
#pragma unroll
          for (int i = 0; i < kLoads; ++i) {
            score[i] += __shfl_xor_sync(0xffffffffu, score[i], o);
          }
        }
        float new_max = running_max[g];
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
          score[i] = p0 + i * P + sub < end ? score[i] * scale : -INFINITY;
          new_max = fmaxf(new_max, score[i]);
        }
#pragma unroll
        for (int o = R; o < 32; o <<= 1) {
          new_max = fmaxf(new_max, __shfl_xor_sync(0xffffffffu, new_max, o));
        }
        // new_max is finite (the tile's first position is real); exp(-inf) = 0 on the first tile.
        const float correction = expf(running_max[g] - new_max);
        running_sum[g] *= correction;
#pragma unroll
        for (int e = 0; e < kRun; ++e) {
          acc[g][e] *= correction;
        }
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
          const float weight = expf(score[i] - new_max);
          running_sum[g] += weight;
#pragma unroll
          for (int e = 0; e < kRun; ++e) {
            acc[g][e] += weight * D::load(value[i].e[e]);
          }
        }
        running_max[g] = new_max;
      }
    }
    slot = next_slot;
  }
  // The P lanes that held the same elements for different positions share one maximum: sum them.
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < group) {
#pragma unroll
      for (int o = R; o < 32; o <<= 1) {
        running_sum[g] += __shfl_xor_sync(0xffffffffu, running_sum[g], o);
#pragma unroll
        for (int e = 0; e < kRun; ++e) {
          acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
        }
      }
      if (lane == 0) {
        shared.max[warp][g] = running_max[g];
        shared.sum[warp][g] = running_sum[g];
      }
#pragma unroll
      for (int e = 0; e < kRun; ++e) {
        if (sub == 0 && e < count) {
          shared.acc[warp][g * dim + first + e] = acc[g][e];
        }
      }
    }
  }
  __syncthreads();
  combine_warps<D, G>(shared, out, partial_acc, partial_max, partial_sum, seq, kv_head, group, heads, dim);
}

// paged_decode_attention_chunk on the tensor cores, for heads of kDim = 64 or 128 elements in bf16 or
// f16 (vectorized caches) and up to 8 query heads per key/value head. The same blocks, chunks, warps and
// outputs; each warp takes tiles of 16 positions and does the products of a tile as mma m16n8k16s:
// - scores: Sᵀ = Q · Kᵀ, 16 query heads (the group's, then zeros) × 8 positions, twice (positions 0-7
//   and 8-15 of the tile), kDim / 16 steps of k. Lane (g, t) holds query head g's and key rows g and
//   g + 8's elements t·kDim/4 .. (t+1)·kDim/4 - 1 (one 16-byte run per 8): a sum does not care about the
//   order of k, so each run's words go where the fragments put the lane's k, the same for Q and K.
// - the online softmax of head g over the tile runs in the 4 lanes of g (their scores are the mma's
//   accumulators for positions 2t, 2t + 1, 8 + 2t, 9 + 2t), and its weights, in the model dtype, are
//   already the B fragment of the next product. A weight is split in two (its rounding and what the
//   rounding left), each a product, so that the sums keep the f32 weights' precision.
// - Oᵀ += Vᵀ · P: kDim / 16 tiles of 16 elements of the head × 8 query heads, k = the 16 positions.
//   Lane (g, t) reads value rows 2t, 2t + 1, 8 + 2t, 9 + 2t, elements g·kDim/8 .. (g+1)·kDim/8 - 1; a
//   word of them (elements 2i, 2i + 1) makes rows g and g + 8 of tile i, so A's pairs of positions are a
//   word's low (or high) halves of two rows.
// So lane (g, t) ends with query heads 2t, 2t + 1 of elements g·kDim/8 + 2i, + 1 (tile i).
constexpr int kMmaTile = 16;
// The tensor-core attention issues a tile's loads while the tile before it is multiplied (1), or all of a
// tile's loads and then its products (0): MMREG_ATTENTION_PIPELINE=0 in the environment, for measuring.
#ifndef MMREG_ATTENTION_PIPELINE
#define MMREG_ATTENTION_PIPELINE 1
#endif

// N runs of 8 elements from `row` on as 32-bit words (zeros where `real` is false: a position past the
// end, a query head past the group).
template <typename T, int N>
__device__ __forceinline__ void load_runs(Pack<unsigned, 4> (&runs)[N], const T* row, bool real) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    runs[j] = Pack<unsigned, 4>{};
    if (real) {
      runs[j] = *reinterpret_cast<const Pack<unsigned, 4>*>(row + 8 * j);
    }
  }
}

template <typename D, int kDim, int W>
__device__ void paged_decode_attention_mma_chunk(AttentionShared<8, W>& shared, typename D::T* out,
                                                 float* partial_acc, float* partial_max,
                                                 float* partial_sum, const typename D::T* q,
                                                 long long q_stride, const typename D::T* key_cache,
                                                 const typename D::T* value_cache, const long long* slots,
                                                 long long slot_stride, const long long* lengths,
                                                 int heads, int kv_heads, float scale) {
  typedef Pack<unsigned, 4> Run;          // 8 elements as 4 words
  constexpr int kKeyRuns = kDim / 32;     // a lane's runs of a key row (its quarter)
  constexpr int kValueRuns = kDim / 64;   // a lane's runs of a value row (its eighth)
  constexpr int kTiles = kDim / 16;       // tiles of the head's elements in Vᵀ · P
  const int seq = blockIdx.x / kv_heads, kv_head = blockIdx.x % kv_heads;
  const int group = heads / kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long long chunk = (slot_stride + gridDim.y - 1) / gridDim.y;
  const long long begin = blockIdx.y * chunk;
  const long long end = min(lengths[seq], begin + chunk);
  const long long* seq_slots = slots + seq * slot_stride;
  const long long head_offset = (long long)kv_head * kDim;
  // Lane l < 16 holds the slot of position p0 + l of the tile at p0 (0 past the tile or the padded
  // list). Entries past the sequence's end are read (they are in the list, whatever they hold) but never
  // used for a load, so that the slots need not wait for the lengths.
  const long long step = W * kMmaTile;
  auto slot_of = [&](long long tile) -> long long {
    return lane < kMmaTile && tile + lane < slot_stride ? seq_slots[tile + lane] : 0;
  };
  long long p0 = begin + warp * kMmaTile;
  // This tile's slots and the next's: read before waiting for the kernel before (which writes the query
  // and this token's key and value) with MMREG_EARLY_READS=1, as the step wrote them before its first
  // layer; else right after the query's loads are issued.
  long long slot = 0, second_slot = 0;
  if (MMREG_EARLY_READS != 0) {
    slot = slot_of(p0);
    second_slot = slot_of(p0 + step);
    begin_kernel();
  }

  Run query[kKeyRuns];
  load_runs(query, q + seq * q_stride + (long long)(kv_head * group + g) * kDim + t * (kDim / 4), g < group);
  if (MMREG_EARLY_READS == 0) {
    slot = slot_of(p0);
    second_slot = slot_of(p0 + step);
  }
#if MMREG_ATTENTION_PIPELINE
  // The loads in flight during a tile's products take the registers the query held: each lane keeps
  // its query runs in shared memory (its own slots: no barrier) and reads them back for each tile.
  __shared__ Run query_runs[W][kKeyRuns][32];
#pragma unroll
  for (int j = 0; j < kKeyRuns; ++j) {
    query_runs[warp][j][lane] = query[j];
  }
#endif
  float acc[kTiles][4] = {};
  float running_max = -INFINITY, running_sum = 0.0f;  // head g's; the sum of this lane's positions

  // A tile's key rows g and g + 8 (the lane's quarter of each), and value rows 2t, 2t + 1, 8 + 2t,
  // 9 + 2t (the lane's eighth); positions past the end read zeros (no load).
  Run key[2][kKeyRuns], value[4][kValueRuns];
  auto load_keys = [&](long long tile, long long tile_slot) {
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int u = g + 8 * n;
      const long long s = __shfl_sync(0xffffffffu, tile_slot, u);
      load_runs(key[n], key_cache + s * kv_heads * kDim + head_offset + t * (kDim / 4), tile + u < end);
    }
  };
  auto load_values = [&](long long tile, long long tile_slot) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int u = 2 * t + (v & 1) + 8 * (v >> 1);
      const long long s = __shfl_sync(0xffffffffu, tile_slot, u);
      load_runs(value[v], value_cache + s * kv_heads * kDim + head_offset + g * (kDim / 8), tile + u < end);
    }
  };
#if MMREG_ATTENTION_PIPELINE
  // The loads of tile i + 1 go out while tile i is multiplied: its keys once tile i's scores are taken,
  // its values once tile i's values are summed, into the same registers (so in flight without more of
  // them); each lane holds the slots of the tile after the next.
  load_keys(p0, slot);
  load_values(p0, slot);
  slot = second_slot;
#endif
  for (; p0 < end; p0 += step) {
#if MMREG_ATTENTION_PIPELINE
    const long long next_slot = slot_of(p0 + 2 * step);
#else
    const long long next_slot = slot_of(p0 + step);
    // Every load of the tile before the first product.
    load_keys(p0, slot);
    load_values(p0, slot);
#endif
    // Sᵀ: score[n] = (head g: positions 8n + 2t, 8n + 2t + 1; rows g + 8, all zero queries).
    float score[2][4] = {};
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int j = 0; j < kKeyRuns; ++j) {
#if MMREG_ATTENTION_PIPELINE
        const Run query_run = query_runs[warp][j][lane];
#else
        const Run query_run = query[j];
#endif
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const unsigned a[4] = {query_run.e[2 * h], 0u, query_run.e[2 * h + 1], 0u};
          const unsigned b[2] = {key[n][j].e[2 * h], key[n][j].e[2 * h + 1]};
          mma_m16n8k16<D>(score[n], a, b);
        }
      }
    }
#if MMREG_ATTENTION_PIPELINE
    load_keys(p0 + step, slot);
#endif
    // The online softmax of head g: positions 2t, 2t + 1, 8 + 2t, 9 + 2t, the maximum over g's lanes.
    float weight[4];
    float new_max = running_max;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int u = 2 * t + (i & 1) + 8 * (i >> 1);
      weight[i] = p0 + u < end ? score[i >> 1][i & 1] * scale : -INFINITY;
      new_max = fmaxf(new_max, weight[i]);
    }
    new_max = fmaxf(new_max, __shfl_xor_sync(0xffffffffu, new_max, 1));
    new_max = fmaxf(new_max, __shfl_xor_sync(0xffffffffu, new_max, 2));
    // new_max is finite (the tile's first position is real); exp(-inf) = 0 on the first tile.
    const float correction = expf(running_max - new_max);
    running_sum *= correction;
    running_max = new_max;
    unsigned high[2], low[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      weight[i] = expf(weight[i] - new_max);
      running_sum += weight[i];
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const u16 h0 = D::store(weight[2 * k]), h1 = D::store(weight[2 * k + 1]);
      high[k] = h0 | ((unsigned)h1 << 16);
      const u16 l0 = D::store(weight[2 * k] - D::load(h0)), l1 = D::store(weight[2 * k + 1] - D::load(h1));
      low[k] = l0 | ((unsigned)l1 << 16);
    }
    // The accumulators' columns are query heads 2t and 2t + 1: their corrections come from lanes 8t, 8t + 4.
    const float correction0 = __shfl_sync(0xffffffffu, correction, 8 * t);
    const float correction1 = __shfl_sync(0xffffffffu, correction, 8 * t + 4);
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
      acc[i][0] *= correction0;
      acc[i][1] *= correction1;
      acc[i][2] *= correction0;
      acc[i][3] *= correction1;
      const unsigned x0 = value[0][i / 4].e[i % 4], x1 = value[1][i / 4].e[i % 4];
      const unsigned x8 = value[2][i / 4].e[i % 4], x9 = value[3][i / 4].e[i % 4];
      const unsigned a[4] = {low_halves(x0, x1), high_halves(x0, x1), low_halves(x8, x9),
                             high_halves(x8, x9)};
      mma_m16n8k16<D>(acc[i], a, high);
      mma_m16n8k16<D>(acc[i], a, low);
    }
#if MMREG_ATTENTION_PIPELINE
    load_values(p0 + step, slot);
#endif
    slot = next_slot;
  }
  // The sums of head g's four lanes; then the warp's results to shared memory.
  running_sum += __shfl_xor_sync(0xffffffffu, running_sum, 1);
  running_sum += __shfl_xor_sync(0xffffffffu, running_sum, 2);
  if (t == 0 && g < group) {
    shared.max[warp][g] = running_max;
    shared.sum[warp][g] = running_sum;
  }
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int head = 2 * t + (c & 1), element = g * (kDim / 8) + 2 * i + (c >> 1);
      if (head < group) {
        shared.acc[warp][head * kDim + element] = acc[i][c];
      }
    }
  }
  __syncthreads();
  combine_warps<D, 8, W>(shared, out, partial_acc, partial_max, partial_sum, seq, kv_head, group, heads,
                        kDim);
}

// The kernel's body for blocks of W warps: f32 has no such mma (the caller never launches it for f32).
template <typename D, int W>
__device__ void paged_decode_attention_mma(AttentionShared<8, W>& shared, typename D::T* out, float* partial_acc,
                                           float* partial_max, float* partial_sum, const typename D::T* q,
                                           long long q_stride, const typename D::T* key_cache,
                                           const typename D::T* value_cache, const long long* slots,
                                           long long slot_stride, const long long* lengths, int heads,
                                           int kv_heads, int dim, float scale) {
  if constexpr (D::kMma != 0) {
    if (dim == 64) {
      paged_decode_attention_mma_chunk<D, 64, W>(shared, out, partial_acc, partial_max, partial_sum, q,
                                                 q_stride, key_cache, value_cache, slots, slot_stride,
                                                 lengths, heads, kv_heads, scale);
    } else {
      paged_decode_attention_mma_chunk<D, 128, W>(shared, out, partial_acc, partial_max, partial_sum, q,
                                                  q_stride, key_cache, value_cache, slots, slot_stride,
                                                  lengths, heads, kv_heads, scale);
    }
  }
}

// The chunks of paged_decode_attention_chunk reduced: one block per (sequence, head) row. The chunks'
// maxima and sums are read in parallel (a thread per chunk) and turned into one factor per chunk; then a
// thread per element (grid-stride) sums the chunks' partials, their loads unrolled so that several are
// in flight. out [rows, dim]; splits at most kMaxSplits (the caller checks).
constexpr int kMaxSplits = 256;

template <typename D>
__device__ void paged_decode_combine_row(typename D::T* out, const float* partial_acc,
                                         const float* partial_max, const float* partial_sum, int splits,
                                         int dim) {
  __shared__ float factor[kMaxSplits];
  const long long row = blockIdx.x;
  partial_acc += row * splits * dim;
  partial_max += row * splits;
  partial_sum += row * splits;
  // A chunk with no position has a sum of 0 and a factor of 0.
  float local_max = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    if (partial_sum[s] > 0.0f) {
      local_max = fmaxf(local_max, partial_max[s]);
    }
  }
  const float total_max = block_max(local_max);
  float local_sum = 0.0f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float f = partial_sum[s] > 0.0f ? expf(partial_max[s] - total_max) : 0.0f;
    factor[s] = f;
    local_sum += partial_sum[s] * f;
  }
  // block_sum's barrier also makes every factor visible to the block.
  const float total_sum = block_sum(local_sum);
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    float total = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
      total += partial_acc[(long long)s * dim + d] * factor[s];
    }
    out[row * dim + d] = D::store(total_sum > 0.0f ? total / total_sum : 0.0f);
  }
}

// y = w · x (+ bias) for one row x (a decode step of one sequence): x [k], w [n, k] (a linear layer's
// weight, as stored), bias [n] or null, y [n]; f32 sums rounded once, as cuBLAS's. The product only
// streams the weight, so each warp takes kLinearRows rows of w at a time and reads them in 16-byte
// vectors, several in flight (unrolled), x coming from the cache; then a warp sum per output. (With
// more rows than one, cuBLAS's kernels win: measured in docs/benchmarks.md.) The caller checks: k a
// multiple of the vector's elements, x and w 16-byte aligned. Launched with kLinearWarps * 32 threads,
// grid-stride over the warps' runs of rows.
//
// A weight with too few rows to keep the device's warps busy (a 7B decoder's o_proj and down_proj:
// 4096 rows, 2048 runs of two, under half the warps an H200 holds) takes linear_one_row_split: kSplit
// warps (2 or 4) share each run, each taking every kSplit-th vector of k, and the block adds their sums
// in order (part 0 first). The caller picks the split from the runs and the device's occupancy.
//
// Two epilogues pair a warp's two rows so that the product's last step is the layer's next op:
// - kSiluMul: w stacks a gate projection over an up projection ([2 * n/2, k], no gap), and y [n/2] is
//   silu(gate · x) * (up · x), each product rounded to the dtype first, as silu_mul after the product:
//   the warp's rows are row i of the gate and row i of the up projection.
// - kRope: w is a decoder layer's stacked q/k/v projection ([heads * dim, k]; the last 2 * kv_heads
//   heads keys and values) and y its rows after rope_and_store for the one token: the warp's rows are
//   elements j and j + dim/2 of a head, rotated (the first `rotated` heads) with the token's cos and
//   sin as rotate_pair does, and the keys' and values' rows also written to the caches at the token's
//   slot.
constexpr int kLinearWarps = 4;
constexpr int kLinearRows = 2;
constexpr int kSiluMul = 1, kRope = 2;

// kRope's arguments (see rope_vectors): the token's cos and sin [dim], the caches, its slot [1].
template <typename D>
struct RopeStore {
  const typename D::T* cos;
  const typename D::T* sin;
  int rotated, dim, kv_heads;
  typename D::T* key_cache;
  typename D::T* value_cache;
  const long long* slots;
};

// What a thread of the few-rows kernels' rope epilogue reads besides the product: its pair's cos and sin
// and where its key or value row goes in the cache (null: a query row, or no cache).
template <typename D>
struct RopeInputs {
  typename D::T cos_low, cos_high, sin_low, sin_high;
  typename D::T* stored;
};

// The rope epilogue's inputs for this thread of a few-rows block whose tile of w starts at row `first`
// (the thread's output and x's row as the epilogue of linear_few_rows takes them); zeros and null for a
// thread with no output there.
template <typename D>
__device__ __forceinline__ RopeInputs<D> rope_inputs(const RopeStore<D>& rope, long long first, int m,
                                                     long long n) {
  RopeInputs<D> in{};
  const int i = threadIdx.x, l = i % 32, q = (i / 32) % 2, tile = i / 64;
  const int row = tile * 8 + 2 * (l % 4) + q;
  if (i >= 128 || row >= m) {
    return in;
  }
  const long long at = first + l / 4;
  const int head = (int)(at / rope.dim), j = (int)(at % rope.dim), h = rope.dim / 2;
  if (head < rope.rotated) {
    const typename D::T* cos = rope.cos + (long long)row * rope.dim;
    const typename D::T* sin = rope.sin + (long long)row * rope.dim;
    in.cos_low = cos[j];
    in.cos_high = cos[j + h];
    in.sin_low = sin[j];
    in.sin_high = sin[j + h];
  }
  in.stored = cache_row<D>(rope.key_cache, rope.value_cache, rope.slots, row, head, (int)(n / rope.dim),
                           rope.kv_heads, rope.dim);
  return in;
}

// The warp's sums of rows `row` of w with x over its part of k (vectors part, part + kSplit, …; all of
// k unsplit): each lane its share, in 16-byte vectors with several in flight, then summed over the warp
// (every lane gets the sums).
template <typename D, int kSplit = 1>
__device__ __forceinline__ void warp_row_products(float (&acc)[kLinearRows],
                                                  const typename D::T* (&row)[kLinearRows],
                                                  const typename D::T* x, long long k, int lane,
                                                  int part = 0) {
  constexpr int N = 16 / sizeof(typename D::T);
  typedef Pack<typename D::T, N> V;
#pragma unroll
  for (int r = 0; r < kLinearRows; ++r) {
    acc[r] = 0.0f;
  }
#pragma unroll 4
  for (long long c = (32LL * part + lane) * N; c < k; c += 32LL * N * kSplit) {
    V weights[kLinearRows];
#pragma unroll
    for (int r = 0; r < kLinearRows; ++r) {
      weights[r] = *reinterpret_cast<const V*>(row[r] + c);
    }
    const V input = *reinterpret_cast<const V*>(x + c);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float v = D::load(input.e[e]);
#pragma unroll
      for (int r = 0; r < kLinearRows; ++r) {
        acc[r] += D::load(weights[r].e[e]) * v;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kLinearRows; ++r) {
    for (int o = 16; o > 0; o >>= 1) {
      acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
  }
}

// Prefetches into L2 the first vectors of the rows the warp reads first (weights no kernel writes),
// before the kernel waits for the one before it: kPrefetchRuns vectors of 16 bytes a lane from each row,
// of its part of k (the engine sets MMREG_LINEAR_PREFETCH_RUNS from the environment variable of that
// name, for measurements).
#ifndef MMREG_LINEAR_PREFETCH_RUNS
#define MMREG_LINEAR_PREFETCH_RUNS 4
#endif
constexpr int kPrefetchRuns = MMREG_LINEAR_PREFETCH_RUNS;

template <typename D, int kSplit = 1>
__device__ __forceinline__ void prefetch_rows(const typename D::T* (&row)[kLinearRows], long long k,
                                              int lane, int part = 0) {
  constexpr int N = 16 / sizeof(typename D::T);
#pragma unroll
  for (int r = 0; r < kLinearRows; ++r) {
#pragma unroll 4
    for (int i = 0; i < kPrefetchRuns; ++i) {
      const long long c = (32LL * (part + kSplit * i) + lane) * N;
      if (row[r] != nullptr && c < k) {
        prefetch_l2(row[r] + c);
      }
    }
  }
}

template <typename D>
__device__ void linear_one_row(typename D::T* y, const typename D::T* x, const typename D::T* w,
                               const typename D::T* bias, long long n, long long k) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  {
    const long long first = ((long long)blockIdx.x * kLinearWarps + warp) * kLinearRows;
    const typename D::T* row[kLinearRows];
#pragma unroll
    for (int r = 0; r < kLinearRows; ++r) {
      row[r] = first + r < n ? w + (first + r) * k : nullptr;
    }
    prefetch_rows<D>(row, k, lane);
  }
  begin_kernel();
  // Grid-stride over the warps' runs of kLinearRows rows of w (the same for the whole warp).
  for (long long first = ((long long)blockIdx.x * kLinearWarps + warp) * kLinearRows; first < n;
       first += (long long)gridDim.x * kLinearWarps * kLinearRows) {
    const typename D::T* row[kLinearRows];
    float acc[kLinearRows];
#pragma unroll
    for (int r = 0; r < kLinearRows; ++r) {
      // A row past the end reads the last one again; its sum is not written.
      row[r] = w + min(first + r, n - 1) * k;
    }
    warp_row_products<D>(acc, row, x, k, lane);
#pragma unroll
    for (int r = 0; r < kLinearRows; ++r) {
      if (lane == 0 && first + r < n) {
        y[first + r] = D::store(acc[r] + (bias != nullptr ? D::load(bias[first + r]) : 0.0f));
      }
    }
  }
}

// linear_one_row with each run of rows shared by kSplit warps of the block (see above). Every warp of
// a block strides over the same runs (a barrier per run).
template <typename D, int kSplit>
__device__ void linear_one_row_split(typename D::T* y, const typename D::T* x, const typename D::T* w,
                                     const typename D::T* bias, long long n, long long k) {
  __shared__ float parts[kLinearWarps][kLinearRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, part = warp % kSplit;
  constexpr int kRuns = kLinearWarps / kSplit;  // a block's
  // The warp's run `at + warp / kSplit` (runs past the end read the last rows again, unwritten).
  auto rows_of = [&](long long at, const typename D::T* (&row)[kLinearRows]) {
    const long long first = (at + warp / kSplit) * kLinearRows;
#pragma unroll
    for (int r = 0; r < kLinearRows; ++r) {
      row[r] = w + min(first + r, n - 1) * k;
    }
    return first;
  };
  {
    const typename D::T* row[kLinearRows];
    rows_of((long long)blockIdx.x * kRuns, row);
    prefetch_rows<D, kSplit>(row, k, lane, part);
  }
  begin_kernel();
  for (long long at = (long long)blockIdx.x * kRuns; at * kLinearRows < n;
       at += (long long)gridDim.x * kRuns) {
    const typename D::T* row[kLinearRows];
    const long long first = rows_of(at, row);
    float acc[kLinearRows];
    warp_row_products<D, kSplit>(acc, row, x, k, lane, part);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kLinearRows; ++r) {
        parts[warp][r] = acc[r];
      }
    }
    __syncthreads();
    if (lane == 0 && part == 0) {
#pragma unroll
      for (int r = 0; r < kLinearRows; ++r) {
        float total = parts[warp][r];
#pragma unroll
        for (int p = 1; p < kSplit; ++p) {
          total += parts[warp + p][r];
        }
        if (first + r < n) {
          y[first + r] = D::store(total + (bias != nullptr ? D::load(bias[first + r]) : 0.0f));
        }
      }
    }
    // (Before the next run's sums take the places.)
    __syncthreads();
  }
}

// The paired epilogues (kSiluMul, kRope): a warp's run `task` is two rows `half` apart, task and
// task + n/2 (kSiluMul), or element j of a head and j + dim/2 (kRope); n/2 runs.
template <typename D, int kEpilogue>
__device__ void linear_one_row_paired(typename D::T* y, const typename D::T* x, const typename D::T* w,
                                      const typename D::T* bias, long long n, long long k,
                                      const RopeStore<D>& rope) {
  static_assert(kLinearRows == 2, "a paired epilogue takes two rows a warp");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long half = kEpilogue == kRope ? rope.dim / 2 : n / 2;
  // (A head's index and element fit an int: n < 2^31.)
  auto first_row = [&](long long task) -> long long {
    const int h = (int)half;
    return kEpilogue == kSiluMul ? task : (long long)((int)task / h * 2 * h + (int)task % h);
  };
  {
    const long long task = (long long)blockIdx.x * kLinearWarps + warp;
    const typename D::T* row[kLinearRows] = {nullptr, nullptr};
    if (task < n / 2) {
      row[0] = w + first_row(task) * k;
      row[1] = row[0] + half * k;
    }
    prefetch_rows<D>(row, k, lane);
  }
  begin_kernel();
  for (long long task = (long long)blockIdx.x * kLinearWarps + warp; task < n / 2;
       task += (long long)gridDim.x * kLinearWarps) {
    const long long first = first_row(task);
    const typename D::T* row[kLinearRows] = {w + first * k, w + (first + half) * k};
    float acc[kLinearRows];
    warp_row_products<D>(acc, row, x, k, lane);
    if (lane != 0) {
      continue;
    }
    if (bias != nullptr) {
      acc[0] += D::load(bias[first]);
      acc[1] += D::load(bias[first + half]);
    }
    if (kEpilogue == kSiluMul) {
      y[first] = silu_times<D>(D::store(acc[0]), D::store(acc[1]));
    } else {
      const int head = (int)(first / rope.dim), j = (int)(first % rope.dim), h = (int)half;
      typename D::T low = D::store(acc[0]), high = D::store(acc[1]);
      if (head < rope.rotated) {
        rotate_pair<D>(low, high, rope.cos[j], rope.cos[j + h], rope.sin[j], rope.sin[j + h]);
      }
      y[first] = low;
      y[first + h] = high;
      typename D::T* stored = cache_row<D>(rope.key_cache, rope.value_cache, rope.slots, 0, head,
                                           (int)(n / rope.dim), rope.kv_heads, rope.dim);
      if (stored != nullptr) {
        stored[j] = low;
        stored[j + h] = high;
      }
    }
  }
}

// A linear layer for a few rows (up to 16: two tiles of 8 of x's rows; an instance for one tile takes
// 1 to 8) on the tensor cores:
// y = x · wᵀ (+ bias) with f32 sums and one rounding to the dtype at the end, as cuBLAS. A decode step of a few sequences reads
// every weight once for all its rows, so the kernel streams w at the bandwidth's pace and does each
// product as an mma m16n8k16: a 16 × 16 tile of w (16 outputs × 16 of k) as A, and 16 of k of up to 8
// rows of x as the 8 columns of B (a second mma for rows 8 to 15).
//
// Each block takes kFewTile = 16 rows of w at a time (grid-stride); its kFewWarps warps split k into
// chunks of 32, each warp kFewUnroll consecutive chunks at once with every load issued before the first
// mma. In a chunk, lane l (g = l / 4, t = l % 4) reads one 16-byte run of 8 elements at k = 32·chunk +
// 8·t from rows g and g + 8 of the tile, and from rows g (and g + 8) of x. A sum does not care about the
// order of k, so the lane hands the mma its run's elements 0-3, then 4-7, in the places where the
// fragment layout puts its lane's four of k: the same permutation for w and x, so each product pairs the
// right elements. The warps' sums meet in shared memory. Rows past n or m read a valid row and are not
// written; runs past k read zeros (k a multiple of 8, checked by the caller with the 16-byte alignment of
// x and w). f32 has no such mma: its kernel does the same products with shuffles (few_rows_products),
// which is slow and serves to check the indexing (the emulator's bf16 and f16 run mma_m16n8k16's).
#ifndef MMREG_FEW_WARPS
#define MMREG_FEW_WARPS 8
#endif
#ifndef MMREG_FEW_UNROLL
#define MMREG_FEW_UNROLL 4
#endif
// The 8-row kernels' chunks a warp loads at once: 4 (70 registers, 3 blocks an SM) measured 1.5% more
// batch-1 decode than 2 (50 registers, 4 blocks) and the same at batch 8 (docs/benchmarks.md, run 60).
#ifndef MMREG_FEW_UNROLL_8
#define MMREG_FEW_UNROLL_8 4
#endif
constexpr int kFewWarps = MMREG_FEW_WARPS;
constexpr int kFewTile = 16;
constexpr int kFewUnroll = MMREG_FEW_UNROLL;

// A lane's run of 8 elements as 32-bit words (two elements a word in bf16 and f16, the first in the low
// half: the mma's order), so that a load fills registers the mma takes as they are.
template <typename D>
struct FewRun {
  typedef Pack<unsigned, 4 * (int)sizeof(typename D::T) / 2> T;
};

template <typename D>
__device__ __forceinline__ float run_element(const typename FewRun<D>::T& run, int e) {
  if constexpr (sizeof(typename D::T) == 2) {
    return D::load((u16)(run.e[e / 2] >> (16 * (e % 2))));
  } else {
    return D::load(__uint_as_float(run.e[e]));
  }
}

// c[tile] += the products of one chunk: w's rows g and g + 8 (runs wa, wb) by x's rows 8·tile + 2t and
// 8·tile + 2t + 1 (x[tile]: the lane's run of row 8·tile + g), for `tiles` (1 or 2) tiles of x's rows.
// c[tile] holds (w row g, x row 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1): the mma's accumulators.
template <typename D>
__device__ __forceinline__ void few_rows_products(float (&c)[2][4], const typename FewRun<D>::T& wa,
                                                  const typename FewRun<D>::T& wb,
                                                  const typename FewRun<D>::T (&x)[2], int tiles) {
  if constexpr (D::kMma != 0) {
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      if (tile < tiles) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Elements 4h, 4h + 1 of a run are word 2h; 4h + 2, 4h + 3 word 2h + 1.
          const unsigned a[4] = {wa.e[2 * h], wb.e[2 * h], wa.e[2 * h + 1], wb.e[2 * h + 1]};
          const unsigned b[2] = {x[tile].e[2 * h], x[tile].e[2 * h + 1]};
          mma_m16n8k16<D>(c[tile], a, b);
        }
      }
    }
    return;
  }
  // f32 (no mma): lane (g, t) gathers the runs of w's rows g and g + 8 (lanes 4g + s) and of x's rows
  // 2t and 2t + 1 (lanes 8t + s and 8t + 4 + s) of each s, and sums their products itself.
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int s = 0; s < 4; ++s) {
    for (int e = 0; e < 8; ++e) {
      const float w0 = __shfl_sync(0xffffffffu, run_element<D>(wa, e), 4 * g + s);
      const float w8 = __shfl_sync(0xffffffffu, run_element<D>(wb, e), 4 * g + s);
      for (int tile = 0; tile < tiles; ++tile) {
        const float x0 = __shfl_sync(0xffffffffu, run_element<D>(x[tile], e), 8 * t + s);
        const float x1 = __shfl_sync(0xffffffffu, run_element<D>(x[tile], e), 8 * t + 4 + s);
        c[tile][0] += w0 * x0;
        c[tile][1] += w0 * x1;
        c[tile][2] += w8 * x0;
        c[tile][3] += w8 * x1;
      }
    }
  }
}

//
// The paired epilogues of the one-row kernels (kSiluMul, kRope; see linear_one_row_paired) for each of
// x's rows: a block's tile is then 8 rows of w and their 8 partners `half` on (the first half of a
// gated projection and the second, or elements j..j+7 of a head and j+dim/2..), rows g and g + 8 of
// the mma, so that the thread that sums a row's output also sums its partner's (the caller checks that
// 8 divides n/2, or dim/2). kRope rotates row r of x's output with row r of cos and sin and stores its
// keys and values at slot r.
//
// kMaxTiles = 1: a kernel for at most 8 rows of x, which needs fewer registers; it loads kUnroll chunks
// at once where the 16-row kernel loads kFewUnroll.
template <typename D, int kEpilogue, int kMaxTiles = 2, int kUnroll = kFewUnroll>
__device__ void linear_few_rows(typename D::T* y, const typename D::T* x, const typename D::T* w,
                                const typename D::T* bias, int m, long long n, long long k,
                                const RopeStore<D>& rope) {
  typedef typename FewRun<D>::T V;
  // The warps' sums, [warp][tile of x's rows][accumulator][lane]: lanes side by side (no bank conflicts).
  __shared__ float sums[kFewWarps][2][4][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // (With one tile, `tiles` stays a value of m and tile 0's loads apart from the weights': the forms in
  // which ptxas issues a group's loads all together, checked in the SASS; with tiles = 1 known, it
  // moves each load next to its product, a few in flight.)
  const int tiles = kMaxTiles > 1 ? (m > 8 ? 2 : 1) : min(m, 1);
  const long long chunks = (k + 31) / 32;
  const typename D::T* xs[2] = {x + min(g, m - 1) * k, x + min(g + 8, m - 1) * k};
  // Tiles of w, the first row of each and the distance to rows g + 8 of the mma.
  const long long half = kEpilogue == kRope ? rope.dim / 2 : n / 2;
  const long long w_tiles = (n + kFewTile - 1) / kFewTile;
  const long long partner = kEpilogue == 0 ? 8 : half;
  auto first_of = [&](long long tile) -> long long {
    if (kEpilogue == 0) {
      return tile * kFewTile;
    }
    if (kEpilogue == kSiluMul) {
      return tile * 8;
    }
    const long long per_head = half / 8;  // a head's tiles (kRope)
    return tile / per_head * 2 * half + tile % per_head * 8;
  };
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const long long first = first_of(blockIdx.x), at = (warp * kUnroll + u) * 32LL + t * 8;
    if (blockIdx.x < w_tiles && at < k) {
      prefetch_l2(w + min(first + g, n - 1) * k + at);
      prefetch_l2(w + min(first + g + partner, n - 1) * k + at);
    }
  }
  // The rope epilogue's inputs are the step's (written before its first layer): see MMREG_EARLY_READS.
  RopeInputs<D> early{};
  if (MMREG_EARLY_READS != 0 && kEpilogue == kRope && blockIdx.x < w_tiles) {
    early = rope_inputs<D>(rope, first_of(blockIdx.x), m, n);
  }
  begin_kernel();
  for (long long w_tile = blockIdx.x; w_tile < w_tiles; w_tile += gridDim.x) {
    const long long first = first_of(w_tile);
    const typename D::T* wa_row = w + min(first + g, n - 1) * k;
    const typename D::T* wb_row = w + min(first + g + partner, n - 1) * k;
    // MMREG_EARLY_READS: the rope epilogue's thread reads its cos, sin and cache slot before the tile's
    // products (the first tile's before waiting for the kernel before), so that these loads are in
    // flight with the weight's rather than after the barrier.
    if (MMREG_EARLY_READS != 0 && kEpilogue == kRope && w_tile != blockIdx.x) {
      early = rope_inputs<D>(rope, first, m, n);
    }
    float c[2][4] = {};
    for (long long group = warp * (long long)kUnroll; group < chunks;
         group += (long long)kFewWarps * kUnroll) {
      // Every load of the group before the first product: predicated loads into zeroed registers.
      V wa[kUnroll], wb[kUnroll], xv[kUnroll][2];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const long long at = (group + u) * 32 + t * 8;
#pragma unroll
        for (int i = 0; i < (int)(sizeof(V) / 4); ++i) {
          wa[u].e[i] = wb[u].e[i] = xv[u][0].e[i] = xv[u][1].e[i] = 0u;
        }
        if (at < k) {
          wa[u] = *reinterpret_cast<const V*>(wa_row + at);
          wb[u] = *reinterpret_cast<const V*>(wb_row + at);
          if (kMaxTiles > 1) {
            xv[u][0] = *reinterpret_cast<const V*>(xs[0] + at);
          }
        }
        if (kMaxTiles == 1 && at < k && tiles > 0) {
          xv[u][0] = *reinterpret_cast<const V*>(xs[0] + at);
        }
        if (at < k && tiles == 2) {
          xv[u][1] = *reinterpret_cast<const V*>(xs[1] + at);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        few_rows_products<D>(c, wa[u], wb[u], xv[u], tiles);
      }
    }
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        sums[warp][tile][q][lane] = c[tile][q];
      }
    }
    __syncthreads();
    if (kEpilogue != 0) {
      // Thread i < 128 sums accumulators (tile, q) and (tile, q + 2) of lane i % 32 over the warps:
      // output `at` of x's row `row` and its partner.
      const int i = threadIdx.x, l = i % 32, q = (i / 32) % 2, tile = i / 64;
      const long long at = first + l / 4;
      const int row = tile * 8 + 2 * (l % 4) + q;
      if (i < 128 && row < m) {
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int v = 0; v < kFewWarps; ++v) {
          a += sums[v][tile][q][l];
          b += sums[v][tile][q + 2][l];
        }
        if (bias != nullptr) {
          a += D::load(bias[at]);
          b += D::load(bias[at + half]);
        }
        if (kEpilogue == kSiluMul) {
          y[row * half + at] = silu_times<D>(D::store(a), D::store(b));
        } else {
          const int head = (int)(at / rope.dim), j = (int)(at % rope.dim), h = (int)half;
          if (MMREG_EARLY_READS == 0) {
            early = rope_inputs<D>(rope, first, m, n);
          }
          typename D::T low = D::store(a), high = D::store(b);
          if (head < rope.rotated) {
            rotate_pair<D>(low, high, early.cos_low, early.cos_high, early.sin_low, early.sin_high);
          }
          y[row * n + at] = low;
          y[row * n + at + h] = high;
          typename D::T* stored = early.stored;
          if (stored != nullptr) {
            stored[j] = low;
            stored[j + h] = high;
          }
        }
      }
    } else {
      // Thread i sums accumulator (tile, q) of lane i % 32 over the warps: 2 × 4 × 32 = the block.
      const int i = threadIdx.x, l = i % 32, q = (i / 32) % 4, tile = i / 128;
      float total = 0.0f;
#pragma unroll
      for (int v = 0; v < kFewWarps; ++v) {
        total += sums[v][tile][q][l];
      }
      const long long out = first + l / 4 + (q >= 2 ? 8 : 0);
      const int row = tile * 8 + 2 * (l % 4) + (q & 1);
      if (row < m && out < n) {
        y[row * n + out] = D::store(total + (bias != nullptr ? D::load(bias[out]) : 0.0f));
      }
    }
    __syncthreads();
  }
}

// The few-rows kernels (plain, SiLU and rope epilogues) for at most `tiles` tiles of 8 of x's rows,
// loading `unroll` chunks a warp at once: linear_few_rows{,_silu,_rope}{eight}_{suffix}.
#define MMREG_FEW_ROWS_KERNELS(D, suffix, eight, tiles, unroll)                                     \
  MMREG_KERNEL void linear_few_rows##eight##_##suffix(D::T* y, const D::T* x, const D::T* w,         \
                                                      const D::T* bias, int m, long long n,        \
                                                      long long k) {                               \
    linear_few_rows<D, 0, tiles, unroll>(y, x, w, bias, m, n, k, RopeStore<D>{});                  \
  }                                                                                                \
  MMREG_KERNEL void linear_few_rows_silu##eight##_##suffix(D::T* y, const D::T* x, const D::T* w,    \
                                                           const D::T* bias, int m, long long n,   \
                                                           long long k) {                          \
    linear_few_rows<D, kSiluMul, tiles, unroll>(y, x, w, bias, m, n, k, RopeStore<D>{});           \
  }                                                                                                \
  MMREG_KERNEL void linear_few_rows_rope##eight##_##suffix(                                        \
      D::T* y, const D::T* x, const D::T* w, const D::T* bias, int m, long long n, long long k,      \
      const D::T* cos, const D::T* sin, int rotated, int dim, D::T* key_cache, D::T* value_cache,     \
      const long long* slots, int kv_heads) {                                                      \
    const RopeStore<D> rope{cos, sin, rotated, dim, kv_heads, key_cache, value_cache, slots};      \
    linear_few_rows<D, kRope, tiles, unroll>(y, x, w, bias, m, n, k, rope);                        \
  }

#define MMREG_ATTENTION(D, suffix, R, G)                                                           \
  MMREG_KERNEL void paged_decode_attention_r##R##_g##G##_##suffix(                                  \
      D::T* out, float* partial_acc, float* partial_max, float* partial_sum, const D::T* q,          \
      long long q_stride, const D::T* key_cache, const D::T* value_cache, const long long* slots,    \
      long long slot_stride, const long long* lengths, int heads, int kv_heads, int dim,            \
      float scale, int vectorized) {                                                                \
    __shared__ AttentionShared<G> shared;                                                         \
    begin_kernel();                                                                               \
    if (vectorized) {                                                                             \
      paged_decode_attention_chunk<D, R, G, true>(shared, out, partial_acc, partial_max,            \
                                                  partial_sum, q, q_stride, key_cache, value_cache, \
                                                  slots, slot_stride, lengths, heads, kv_heads,     \
                                                  dim, scale);                                      \
    } else {                                                                                      \
      paged_decode_attention_chunk<D, R, G, false>(shared, out, partial_acc, partial_max,           \
                                                   partial_sum, q, q_stride, key_cache,             \
                                                   value_cache, slots, slot_stride, lengths, heads, \
                                                   kv_heads, dim, scale);                           \
    }                                                                                             \
  }

#define MMREG_ATTENTION_GROUPS(D, suffix, R) \
  MMREG_ATTENTION(D, suffix, R, 1)           \
  MMREG_ATTENTION(D, suffix, R, 4)           \
  MMREG_ATTENTION(D, suffix, R, 8)

#define MMREG_KERNELS(D, suffix)                                                                   \
  MMREG_KERNEL void rms_norm_##suffix(D::T* out, const D::T* x, const D::T* weight, int cols,       \
                                      float eps) {                                                 \
    begin_kernel();                                                                            \
    rms_norm_row<D>(out, nullptr, x, nullptr, weight, cols, eps);                                  \
  }                                                                                                \
  MMREG_KERNEL void add_rms_norm_##suffix(D::T* out, D::T* sum, const D::T* x, const D::T* delta,   \
                                          const D::T* weight, int cols, float eps) {               \
    begin_kernel();                                                                            \
    rms_norm_row<D>(out, sum, x, delta, weight, cols, eps);                                        \
  }                                                                                                \
  MMREG_KERNEL void rms_norm_vectors_##suffix(D::T* out, const D::T* x, const D::T* weight,         \
                                              int cols, float eps) {                               \
    rms_norm_row_vectors<D>(out, nullptr, x, nullptr, weight, cols, eps);                          \
  }                                                                                                \
  MMREG_KERNEL void add_rms_norm_vectors_##suffix(D::T* out, D::T* sum, const D::T* x,              \
                                                  const D::T* delta, const D::T* weight, int cols, \
                                                  float eps) {                                     \
    rms_norm_row_vectors<D>(out, sum, x, delta, weight, cols, eps);                                \
  }                                                                                                \
  MMREG_KERNEL void silu_mul_##suffix(D::T* out, const D::T* gate_up, long long rows,               \
                                      long long cols) {                                            \
    begin_kernel();                                                                            \
    silu_mul_all<D>(out, gate_up, rows, cols);                                                     \
  }                                                                                                \
  MMREG_KERNEL void rope_##suffix(D::T* out, const D::T* qkv, const D::T* cos, const D::T* sin,     \
                                  long long tokens, int heads, int rotated, int dim,               \
                                  D::T* key_cache, D::T* value_cache, const long long* slots,      \
                                  int kv_heads, long long slack) {                                 \
    begin_kernel();                                                                            \
    rope_all<D>(out, qkv, cos, sin, tokens, heads, rotated, dim, key_cache, value_cache, slots,    \
                kv_heads, slack);                                                                  \
  }                                                                                                \
  MMREG_KERNEL void paged_decode_combine_##suffix(D::T* out, const float* partial_acc,              \
                                                  const float* partial_max,                        \
                                                  const float* partial_sum, int splits, int dim) { \
    begin_kernel();                                                                            \
    paged_decode_combine_row<D>(out, partial_acc, partial_max, partial_sum, splits, dim);          \
  }                                                                                                \
  MMREG_ATTENTION_GROUPS(D, suffix, 8)                                                             \
  MMREG_ATTENTION_GROUPS(D, suffix, 16)                                                            \
  MMREG_ATTENTION_GROUPS(D, suffix, 32)                                                            \
  MMREG_KERNEL void __launch_bounds__(kWarps * 32, 3) paged_decode_attention_mma_##suffix(        \
      D::T* out, float* partial_acc, float* partial_max, float* partial_sum, const D::T* q,          \
      long long q_stride, const D::T* key_cache, const D::T* value_cache, const long long* slots,    \
      long long slot_stride, const long long* lengths, int heads, int kv_heads, int dim,            \
      float scale, int /* vectorized: the caller checks */) {                                   \
    __shared__ AttentionShared<8> shared;                                                         \
    if (MMREG_EARLY_READS == 0) {                                                                 \
      begin_kernel();                                                                             \
    }                                                                                             \
    paged_decode_attention_mma<D, kWarps>(shared, out, partial_acc, partial_max, partial_sum, q,    \
                                          q_stride, key_cache, value_cache, slots, slot_stride,     \
                                          lengths, heads, kv_heads, dim, scale);                    \
  }                                                                                                \
  MMREG_KERNEL void __launch_bounds__(kWideWarps * 32, 2) paged_decode_attention_mma_w6_##suffix( \
      D::T* out, float* partial_acc, float* partial_max, float* partial_sum, const D::T* q,          \
      long long q_stride, const D::T* key_cache, const D::T* value_cache, const long long* slots,    \
      long long slot_stride, const long long* lengths, int heads, int kv_heads, int dim,            \
      float scale, int /* vectorized: the caller checks */) {                                   \
    __shared__ AttentionShared<8, kWideWarps> shared;                                             \
    if (MMREG_EARLY_READS == 0) {                                                                 \
      begin_kernel();                                                                             \
    }                                                                                             \
    paged_decode_attention_mma<D, kWideWarps>(shared, out, partial_acc, partial_max, partial_sum,   \
                                              q, q_stride, key_cache, value_cache, slots,           \
                                              slot_stride, lengths, heads, kv_heads, dim, scale);   \
  }                                                                                                \
  MMREG_KERNEL void linear_one_row_##suffix(D::T* y, const D::T* x, const D::T* w,                  \
                                            const D::T* bias, long long n, long long k) {          \
    linear_one_row<D>(y, x, w, bias, n, k);                                                        \
  }                                                                                                \
  MMREG_KERNEL void linear_one_row_split2_##suffix(D::T* y, const D::T* x, const D::T* w,           \
                                                   const D::T* bias, long long n, long long k) {   \
    linear_one_row_split<D, 2>(y, x, w, bias, n, k);                                               \
  }                                                                                                \
  MMREG_KERNEL void linear_one_row_split4_##suffix(D::T* y, const D::T* x, const D::T* w,           \
                                                   const D::T* bias, long long n, long long k) {   \
    linear_one_row_split<D, 4>(y, x, w, bias, n, k);                                               \
  }                                                                                                \
  MMREG_KERNEL void linear_one_row_silu_##suffix(D::T* y, const D::T* x, const D::T* w,             \
                                                 const D::T* bias, long long n, long long k) {     \
    linear_one_row_paired<D, kSiluMul>(y, x, w, bias, n, k, RopeStore<D>{});                       \
  }                                                                                                \
  MMREG_KERNEL void linear_one_row_rope_##suffix(                                                  \
      D::T* y, const D::T* x, const D::T* w, const D::T* bias, long long n, long long k,             \
      const D::T* cos, const D::T* sin, int rotated, int dim, D::T* key_cache, D::T* value_cache,     \
      const long long* slots, int kv_heads) {                                                      \
    const RopeStore<D> rope{cos, sin, rotated, dim, kv_heads, key_cache, value_cache, slots};      \
    linear_one_row_paired<D, kRope>(y, x, w, bias, n, k, rope);                                    \
  }                                                                                                \
  MMREG_FEW_ROWS_KERNELS(D, suffix, , 2, kFewUnroll)                                               \
  MMREG_FEW_ROWS_KERNELS(D, suffix, _8, 1, MMREG_FEW_UNROLL_8)                                     \
  MMREG_KERNEL void silu_mul_vectors_##suffix(D::T* out, const D::T* gate_up, long long rows,       \
                                              long long cols) {                                    \
    begin_kernel();                                                                            \
    silu_mul_vectors<D>(out, gate_up, rows, cols);                                                 \
  }                                                                                                \
  MMREG_KERNEL void rope_vectors_##suffix(D::T* out, const D::T* qkv, const D::T* cos,              \
                                          const D::T* sin, long long tokens, int heads,            \
                                          int rotated, int dim, D::T* key_cache,                   \
                                          D::T* value_cache, const long long* slots,               \
                                          int kv_heads, long long slack) {                         \
    begin_kernel();                                                                            \
    rope_vectors<D>(out, qkv, cos, sin, tokens, heads, rotated, dim, key_cache, value_cache,       \
                    slots, kv_heads, slack);                                                       \
  }                                                                                                \
  MMREG_KERNEL void quick_gelu_##suffix(D::T* out, const D::T* x, long long n) {                   \
    begin_kernel();                                                                            \
    quick_gelu_all<D>(out, x, n);                                                                  \
  }                                                                                                \
  MMREG_KERNEL void quick_gelu_vectors_##suffix(D::T* out, const D::T* x, long long vectors) {     \
    begin_kernel();                                                                            \
    quick_gelu_vectors<D>(out, x, vectors);                                                        \
  }                                                                                                \
  MMREG_KERNEL void add_layer_norm_vectors_##suffix(D::T* out, D::T* sum, const D::T* x,            \
                                                    const D::T* delta, const D::T* weight,         \
                                                    const D::T* bias, int cols, float eps) {       \
    begin_kernel();                                                                            \
    add_layer_norm_row_vectors<D>(out, sum, x, delta, weight, bias, cols, eps);                    \
  }                                                                                                \
  MMREG_KERNEL void argmax_rows_##suffix(long long* out, const D::T* x, int cols, int vectorized) { \
    begin_kernel();                                                                            \
    argmax_row<D>(out, x, cols, vectorized != 0);                                                  \
  }

MMREG_KERNELS(F32, f32)
MMREG_KERNELS(BF16, bf16)
MMREG_KERNELS(F16, f16)
