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

struct F32 {
  typedef float T;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};

struct BF16 {
  typedef u16 T;
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

// x rounded to the storage type and back: what HF gets when an op writes a tensor of the model dtype.
template <typename D>
__device__ __forceinline__ float round_to(float x) {
  return D::load(D::store(x));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    partial[warp] = v;
  }
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? partial[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

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

// silu(gate) * up for a stacked [rows, 2 * cols] projection (gate first): HF's act_fn(gate) * up,
// with silu's result rounded before the product. Grid-stride loops over rows (y) and columns (x): no
// per-element division.
template <typename D>
__device__ void silu_mul_all(typename D::T* out, const typename D::T* gate_up, long long rows,
                             long long cols) {
  for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
    const typename D::T* gate = gate_up + r * 2 * cols;
    const typename D::T* up = gate + cols;
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < cols;
         c += (long long)gridDim.x * blockDim.x) {
      const float g = D::load(gate[c]);
      out[r * cols + c] = D::store(round_to<D>(g / (1.0f + expf(-g))) * D::load(up[c]));
    }
  }
}

// Rotary embedding of the stacked [tokens, heads, dim] q/k/v projection: the first `rotated` heads
// (queries and keys) become x * cos + rotate_half(x) * sin, each product rounded as in HF; the rest
// (values) are copied. cos and sin are [tokens, dim] in the model dtype. Each thread takes a pair of
// elements j and j + dim/2 (which rotate into each other) of a row (token, head): grid-stride loops
// over rows (y) and pairs (x).
//
// With caches (not null), the last 2 * kv_heads heads are the keys and the values: their rows are also
// stored at the token's slot, `key_cache`/`value_cache` being [slots, kv_heads, dim] (the KV-cache write
// of the step, in the same pass).
template <typename D>
__device__ void rope_all(typename D::T* out, const typename D::T* qkv, const typename D::T* cos,
                         const typename D::T* sin, long long tokens, int heads, int rotated, int dim,
                         typename D::T* key_cache, typename D::T* value_cache, const long long* slots,
                         int kv_heads) {
  const int half = dim / 2;
  const int first_key = heads - 2 * kv_heads, first_value = heads - kv_heads;
  for (long long row = blockIdx.y; row < tokens * heads; row += gridDim.y) {
    const long long t = row / heads;
    const int head = row % heads;
    const typename D::T* x = qkv + row * dim;
    typename D::T* y = out + row * dim;
    typename D::T* stored = nullptr;
    if (key_cache != nullptr && head >= first_key) {
      typename D::T* cache = head < first_value ? key_cache : value_cache;
      const int kv_head = head < first_value ? head - first_key : head - first_value;
      stored = cache + (slots[t] * kv_heads + kv_head) * dim;
    }
    const typename D::T* c = cos + t * dim;
    const typename D::T* s = sin + t * dim;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < half; j += gridDim.x * blockDim.x) {
      typename D::T low = x[j], high = x[j + half];
      if (head < rotated) {
        const float first = D::load(low), second = D::load(high);
        // rotate_half(x) = (-second, first).
        low = D::store(round_to<D>(first * D::load(c[j])) + round_to<D>(-second * D::load(s[j])));
        high = D::store(round_to<D>(second * D::load(c[j + half])) +
                        round_to<D>(first * D::load(s[j + half])));
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

// Decode attention over the paged KV cache, reading each sequence's keys and values where they are (no
// gathered copy): one block per (sequence, key/value head), its warps taking every kWarps-th position of
// the sequence's `lengths[seq]` slots (`slots[seq * slot_stride + p]`), with an online softmax in f32,
// then combined across warps. The head's `group` query heads (grouped-query attention) share each key
// and value read. q is [sequences, heads, dim] with `q_stride` elements between sequences; caches are
// [slots, kv_heads, dim]; out is [sequences, heads, dim]. Each lane holds E consecutive elements of a
// head (lanes past the end hold none): E = 1, 2, 4 or 8 for heads of up to 32, 64, 128 or 256. Loops
// run to compile-time bounds, so every per-lane array stays in registers. group at most 8 and
// group * dim at most 1024 (the caller checks). Launched with kWarps * 32 threads.
constexpr int kWarps = 8;
constexpr int kMaxGroup = 8;
constexpr int kMaxGroupDim = 1024;  // group * dim

template <typename D, int E>
__device__ void paged_decode_attention_block(typename D::T* out, const typename D::T* q, long long q_stride,
                                             const typename D::T* key_cache,
                                             const typename D::T* value_cache, const long long* slots,
                                             long long slot_stride, const long long* lengths, int heads,
                                             int kv_heads, int dim, float scale) {
  __shared__ float shared_max[kWarps][kMaxGroup];
  __shared__ float shared_sum[kWarps][kMaxGroup];
  __shared__ float shared_acc[kWarps][kMaxGroupDim];
  const int seq = blockIdx.x / kv_heads, kv_head = blockIdx.x % kv_heads;
  const int group = heads / kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first = lane * E, count = first >= dim ? 0 : min(E, dim - first);
  const long long length = lengths[seq];

  float query[kMaxGroup][E];
  float acc[kMaxGroup][E];
  float running_max[kMaxGroup], running_sum[kMaxGroup];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    const typename D::T* row = q + seq * q_stride + (long long)(kv_head * group + g) * dim + first;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      query[g][e] = g < group && e < count ? D::load(row[e]) : 0.0f;
      acc[g][e] = 0.0f;
    }
    running_max[g] = -INFINITY;
    running_sum[g] = 0.0f;
  }
  for (long long p = warp; p < length; p += kWarps) {
    const long long slot = slots[seq * slot_stride + p];
    const long long offset = (slot * kv_heads + kv_head) * dim + first;
    float key[E], value[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      key[e] = e < count ? D::load(key_cache[offset + e]) : 0.0f;
      value[e] = e < count ? D::load(value_cache[offset + e]) : 0.0f;
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      // The same for every lane: the shuffles below see the whole warp.
      if (g < group) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          dot += query[g][e] * key[e];
        }
        for (int o = 16; o > 0; o >>= 1) {
          dot += __shfl_xor_sync(0xffffffffu, dot, o);
        }
        const float score = dot * scale;
        const float new_max = fmaxf(running_max[g], score);
        const float correction = expf(running_max[g] - new_max);
        const float weight = expf(score - new_max);
        running_sum[g] = running_sum[g] * correction + weight;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          acc[g][e] = acc[g][e] * correction + weight * value[e];
        }
        running_max[g] = new_max;
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < group) {
      if (lane == 0) {
        shared_max[warp][g] = running_max[g];
        shared_sum[warp][g] = running_sum[g];
      }
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (e < count) {
          shared_acc[warp][g * dim + first + e] = acc[g][e];
        }
      }
    }
  }
  __syncthreads();
  // Each thread combines some (head, element) pairs over the warps; a warp that saw no position has
  // a sum of 0 and is skipped.
  for (int i = threadIdx.x; i < group * dim; i += blockDim.x) {
    const int g = i / dim;
    float total_max = -INFINITY;
    for (int w = 0; w < kWarps; ++w) {
      if (shared_sum[w][g] > 0.0f) {
        total_max = fmaxf(total_max, shared_max[w][g]);
      }
    }
    float total_sum = 0.0f, total = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      if (shared_sum[w][g] > 0.0f) {
        const float factor = expf(shared_max[w][g] - total_max);
        total_sum += shared_sum[w][g] * factor;
        total += shared_acc[w][i] * factor;
      }
    }
    out[((long long)seq * heads + kv_head * group + g) * dim + (i % dim)] = D::store(total / total_sum);
  }
}

#define MMREG_ATTENTION(D, suffix, E)                                                              \
  MMREG_KERNEL void paged_decode_attention_e##E##_##suffix(                                        \
      D::T* out, const D::T* q, long long q_stride, const D::T* key_cache, const D::T* value_cache,  \
      const long long* slots, long long slot_stride, const long long* lengths, int heads,            \
      int kv_heads, int dim, float scale) {                                                        \
    paged_decode_attention_block<D, E>(out, q, q_stride, key_cache, value_cache, slots,            \
                                       slot_stride, lengths, heads, kv_heads, dim, scale);         \
  }

#define MMREG_KERNELS(D, suffix)                                                                   \
  MMREG_KERNEL void rms_norm_##suffix(D::T* out, const D::T* x, const D::T* weight,      \
                                               int cols, float eps) {                              \
    rms_norm_row<D>(out, nullptr, x, nullptr, weight, cols, eps);                                  \
  }                                                                                                \
  MMREG_KERNEL void add_rms_norm_##suffix(D::T* out, D::T* sum, const D::T* x,           \
                                                   const D::T* delta, const D::T* weight,          \
                                                   int cols, float eps) {                          \
    rms_norm_row<D>(out, sum, x, delta, weight, cols, eps);                                        \
  }                                                                                                \
  MMREG_KERNEL void silu_mul_##suffix(D::T* out, const D::T* gate_up, long long rows,    \
                                               long long cols) {                                   \
    silu_mul_all<D>(out, gate_up, rows, cols);                                                     \
  }                                                                                                \
  MMREG_KERNEL void rope_##suffix(D::T* out, const D::T* qkv, const D::T* cos, const D::T* sin,     \
                                  long long tokens, int heads, int rotated, int dim,               \
                                  D::T* key_cache, D::T* value_cache, const long long* slots,      \
                                  int kv_heads) {                                                  \
    rope_all<D>(out, qkv, cos, sin, tokens, heads, rotated, dim, key_cache, value_cache, slots,    \
                kv_heads);                                                                         \
  }                                                                                                \
  MMREG_ATTENTION(D, suffix, 1)                                                                    \
  MMREG_ATTENTION(D, suffix, 2)                                                                    \
  MMREG_ATTENTION(D, suffix, 4)                                                                    \
  MMREG_ATTENTION(D, suffix, 8)

MMREG_KERNELS(F32, f32)
MMREG_KERNELS(BF16, bf16)
MMREG_KERNELS(F16, f16)
