// Runs csrc/fused_kernels.cu on the CPU, for tests where there is no GPU: every CUDA thread of a block is
// an OS thread, __syncthreads a barrier of the block, warp shuffles an exchange through memory between
// two barriers of the warp. Blocks, and launches, run one after another, so `__shared__` (a static here)
// is the running block's. Slow, and only as exact as the host's expf and rsqrt: it checks the kernels'
// indexing, roundings and reductions, not their speed.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace mmreg_emulator {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

constexpr int kWarpWords = 8;

struct Block {
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::uint64_t> exchange;
  std::vector<unsigned> words;  // kWarpWords a thread, for warp_gather
  explicit Block(unsigned threads) : all(threads), exchange(threads), words(threads * kWarpWords) {
    for (unsigned w = 0; w < threads / 32; ++w) {
      warps.push_back(std::make_unique<std::barrier<>>(32));
    }
  }
};

Dim grid_dim, block_dim;
thread_local Dim thread_idx, block_idx;
thread_local Block* block = nullptr;

inline void syncthreads() { block->all.arrive_and_wait(); }

// What lane `source(lane)` of this thread's warp holds in `v`: every lane writes its value, the warp
// waits, each reads its source's, the warp waits again.
template <typename T, typename Source>
T shuffle(T v, Source source) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t));
  auto& warp = *block->warps[thread_idx.x / 32];
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  block->exchange[thread_idx.x] = bits;
  warp.arrive_and_wait();
  const unsigned lane = thread_idx.x % 32, first = thread_idx.x - lane;
  bits = block->exchange[first + (source(lane) & 31u)];
  warp.arrive_and_wait();
  T other;
  std::memcpy(&other, &bits, sizeof(T));
  return other;
}

template <typename T>
T shfl_xor(T v, int offset) {
  return shuffle(v, [offset](unsigned lane) { return lane ^ static_cast<unsigned>(offset); });
}

template <typename T>
T shfl(T v, int source) {
  return shuffle(v, [source](unsigned) { return static_cast<unsigned>(source); });
}

// Every lane's N words, for each lane of this thread's warp, in one exchange (the emulated mma's
// fragments: as many shuffles would take a barrier each).
template <int N>
void warp_gather(const unsigned (&mine)[N], unsigned (&all)[32][N]) {
  static_assert(N <= kWarpWords);
  auto& warp = *block->warps[thread_idx.x / 32];
  std::memcpy(&block->words[thread_idx.x * kWarpWords], mine, sizeof(mine));
  warp.arrive_and_wait();
  const unsigned first = thread_idx.x - thread_idx.x % 32;
  for (unsigned lane = 0; lane < 32; ++lane) {
    std::memcpy(all[lane], &block->words[(first + lane) * kWarpWords], sizeof(mine));
  }
  warp.arrive_and_wait();
}

// Runs `kernel` for every thread of every block of a grid_x × grid_y grid; `threads` a multiple of 32.
// One launch at a time in the process: the dimensions and `__shared__` memory are global.
void launch(unsigned grid_x, unsigned grid_y, unsigned threads, const std::function<void()>& kernel) {
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  grid_dim = {grid_x, grid_y, 1};
  block_dim = {threads, 1, 1};
  // One OS thread per CUDA thread of a block, reused for every block; a barrier between blocks keeps the
  // next from starting before this one is done with `__shared__` memory.
  Block state(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = {t, 0, 0};
      block = &state;
      for (unsigned by = 0; by < grid_y; ++by) {
        for (unsigned bx = 0; bx < grid_x; ++bx) {
          block_idx = {bx, by, 0};
          kernel();
          state.all.arrive_and_wait();
        }
      }
    });
  }
  for (auto& thread : pool) {
    thread.join();
  }
}

}  // namespace mmreg_emulator

#define MMREG_EMULATE
#define MMREG_KERNEL static
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (mmreg_emulator::thread_idx)
#define blockIdx (mmreg_emulator::block_idx)
#define blockDim (mmreg_emulator::block_dim)
#define gridDim (mmreg_emulator::grid_dim)
#define __syncthreads() mmreg_emulator::syncthreads()
#define __shfl_xor_sync(mask, v, offset) mmreg_emulator::shfl_xor((v), (offset))
#define __shfl_sync(mask, v, source) mmreg_emulator::shfl((v), (source))
inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// The fast intrinsics as their exact counterparts (the emulator checks indexing, not their ulps).
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
using std::min;
// (For scripts/gpu/linear_lab.cu's prototypes.) Blocks run one after another here, so a fence orders
// nothing more than the host's would, and an atomic only has the block's own threads to race with.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T __ldcg(const T* address) {
  return *address;
}

#include "fused_kernels.cu"

namespace {

template <typename T>
T arg(void** args, int i) {
  T value;
  std::memcpy(&value, args[i], sizeof(T));
  return value;
}

#define MMREG_EMULATED_ATTENTION(suffix, T, R, G) \
  MMREG_EMULATED_ATTENTION_KERNEL(paged_decode_attention_r##R##_g##G##_##suffix, T)

#define MMREG_EMULATED_ATTENTION_KERNEL(kernel, T)                                                  \
  [](void** a) {                                                                                      \
    kernel(                                                                                           \
        arg<T*>(a, 0), arg<float*>(a, 1), arg<float*>(a, 2), arg<float*>(a, 3), arg<const T*>(a, 4),  \
        arg<long long>(a, 5), arg<const T*>(a, 6), arg<const T*>(a, 7), arg<const long long*>(a, 8),  \
        arg<long long>(a, 9), arg<const long long*>(a, 10), arg<int>(a, 11), arg<int>(a, 12),         \
        arg<int>(a, 13), arg<float>(a, 14), arg<int>(a, 15));                                         \
  }

#define MMREG_EMULATED_ATTENTION_GROUPS(suffix, T, R)                                   \
  MMREG_EMULATED_ATTENTION(suffix, T, R, 1), MMREG_EMULATED_ATTENTION(suffix, T, R, 4), \
      MMREG_EMULATED_ATTENTION(suffix, T, R, 8)

// A few-rows linear kernel's entry (y, x, w, bias, m, n, k), and one with the rope epilogue's arguments.
#define MMREG_EMULATED_FEW_ROWS(kernel, T)                                                          \
  [](void** a) { kernel(arg<T*>(a, 0), arg<const T*>(a, 1), arg<const T*>(a, 2), arg<const T*>(a, 3),  \
                        arg<int>(a, 4), arg<long long>(a, 5), arg<long long>(a, 6)); }
#define MMREG_EMULATED_FEW_ROWS_ROPE(kernel, T)                                                     \
  [](void** a) { kernel(arg<T*>(a, 0), arg<const T*>(a, 1), arg<const T*>(a, 2), arg<const T*>(a, 3),  \
                        arg<int>(a, 4), arg<long long>(a, 5), arg<long long>(a, 6),                  \
                        arg<const T*>(a, 7), arg<const T*>(a, 8), arg<int>(a, 9), arg<int>(a, 10),    \
                        arg<T*>(a, 11), arg<T*>(a, 12), arg<const long long*>(a, 13),                 \
                        arg<int>(a, 14)); }

// The kernels in the order of `NAMES` in src/kernels/launch.rs, for each dtype: f32, bf16, f16.
#define MMREG_EMULATED(suffix, T)                                                                      \
  [](void** a) { rms_norm_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1), arg<const T*>(a, 2),           \
                                   arg<int>(a, 3), arg<float>(a, 4)); },                              \
  [](void** a) { add_rms_norm_##suffix(arg<T*>(a, 0), arg<T*>(a, 1), arg<const T*>(a, 2),             \
                                       arg<const T*>(a, 3), arg<const T*>(a, 4), arg<int>(a, 5),      \
                                       arg<float>(a, 6)); },                                          \
  [](void** a) { rms_norm_vectors_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1),                        \
                                           arg<const T*>(a, 2), arg<int>(a, 3), arg<float>(a, 4)); }, \
  [](void** a) { add_rms_norm_vectors_##suffix(arg<T*>(a, 0), arg<T*>(a, 1), arg<const T*>(a, 2),     \
                                               arg<const T*>(a, 3), arg<const T*>(a, 4),              \
                                               arg<int>(a, 5), arg<float>(a, 6)); },                  \
  [](void** a) { silu_mul_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1), arg<long long>(a, 2),          \
                                   arg<long long>(a, 3)); },                                          \
  [](void** a) { rope_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1), arg<const T*>(a, 2),              \
                               arg<const T*>(a, 3), arg<long long>(a, 4), arg<int>(a, 5),             \
                               arg<int>(a, 6), arg<int>(a, 7), arg<T*>(a, 8), arg<T*>(a, 9),          \
                               arg<const long long*>(a, 10), arg<int>(a, 11),                         \
                               arg<long long>(a, 12)); },                                             \
  [](void** a) { paged_decode_combine_##suffix(arg<T*>(a, 0), arg<const float*>(a, 1),                \
                                               arg<const float*>(a, 2), arg<const float*>(a, 3),      \
                                               arg<int>(a, 4), arg<int>(a, 5)); },                    \
  MMREG_EMULATED_ATTENTION_GROUPS(suffix, T, 8), MMREG_EMULATED_ATTENTION_GROUPS(suffix, T, 16),      \
  MMREG_EMULATED_ATTENTION_GROUPS(suffix, T, 32),                                                     \
  MMREG_EMULATED_ATTENTION_KERNEL(paged_decode_attention_mma_##suffix, T),                            \
  [](void** a) { linear_one_row_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1), arg<const T*>(a, 2),     \
                                         arg<const T*>(a, 3), arg<long long>(a, 4),                   \
                                         arg<long long>(a, 5)); },                                    \
  [](void** a) { silu_mul_vectors_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1), arg<long long>(a, 2),  \
                                           arg<long long>(a, 3)); },                                  \
  [](void** a) { rope_vectors_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1), arg<const T*>(a, 2),      \
                                       arg<const T*>(a, 3), arg<long long>(a, 4), arg<int>(a, 5),     \
                                       arg<int>(a, 6), arg<int>(a, 7), arg<T*>(a, 8), arg<T*>(a, 9),  \
                                       arg<const long long*>(a, 10), arg<int>(a, 11),                 \
                                       arg<long long>(a, 12)); },                                     \
  MMREG_EMULATED_FEW_ROWS(linear_few_rows_##suffix, T),                                              \
  [](void** a) { linear_one_row_silu_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1),                     \
                                              arg<const T*>(a, 2), arg<const T*>(a, 3),               \
                                              arg<long long>(a, 4), arg<long long>(a, 5)); },         \
  [](void** a) { linear_one_row_rope_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1),                     \
                                              arg<const T*>(a, 2), arg<const T*>(a, 3),               \
                                              arg<long long>(a, 4), arg<long long>(a, 5),             \
                                              arg<const T*>(a, 6), arg<const T*>(a, 7), arg<int>(a, 8), \
                                              arg<int>(a, 9), arg<T*>(a, 10), arg<T*>(a, 11),         \
                                              arg<const long long*>(a, 12), arg<int>(a, 13)); }, \
  [](void** a) { linear_one_row_split2_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1),                  \
                                                arg<const T*>(a, 2), arg<const T*>(a, 3),             \
                                                arg<long long>(a, 4), arg<long long>(a, 5)); },       \
  [](void** a) { linear_one_row_split4_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1),                  \
                                                arg<const T*>(a, 2), arg<const T*>(a, 3),             \
                                                arg<long long>(a, 4), arg<long long>(a, 5)); },      \
  MMREG_EMULATED_FEW_ROWS(linear_few_rows_silu_##suffix, T),                                         \
  MMREG_EMULATED_FEW_ROWS_ROPE(linear_few_rows_rope_##suffix, T),                                    \
  MMREG_EMULATED_FEW_ROWS(linear_few_rows_8_##suffix, T),                                            \
  MMREG_EMULATED_FEW_ROWS(linear_few_rows_silu_8_##suffix, T),                                       \
  MMREG_EMULATED_FEW_ROWS_ROPE(linear_few_rows_rope_8_##suffix, T),                                  \
  [](void** a) { quick_gelu_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1), arg<long long>(a, 2)); },   \
  [](void** a) { quick_gelu_vectors_##suffix(arg<T*>(a, 0), arg<const T*>(a, 1),                     \
                                             arg<long long>(a, 2)); },                                \
  MMREG_EMULATED_ATTENTION_KERNEL(paged_decode_attention_mma_w6_##suffix, T),                         \
  [](void** a) { add_layer_norm_vectors_##suffix(arg<T*>(a, 0), arg<T*>(a, 1), arg<const T*>(a, 2),   \
                                                 arg<const T*>(a, 3), arg<const T*>(a, 4),           \
                                                 arg<const T*>(a, 5), arg<int>(a, 6),                \
                                                 arg<float>(a, 7)); },                                \
  [](void** a) { argmax_rows_##suffix(arg<long long*>(a, 0), arg<const T*>(a, 1), arg<int>(a, 2),    \
                                      arg<int>(a, 3)); }

using Emulated = void (*)(void**);
const Emulated kEmulated[] = {MMREG_EMULATED(f32, float), MMREG_EMULATED(bf16, u16),
                              MMREG_EMULATED(f16, u16)};

}  // namespace

extern "C" {

// Runs kernel number `id` (see kEmulated) on grid_x × grid_y blocks of `block` threads; `args` point at its
// arguments, as for cuLaunchKernel. Returns non-zero for an unknown id or a block size that is not a
// multiple of 32.
int mmreg_emulator_launch(int id, unsigned grid_x, unsigned grid_y, unsigned block, void** args) {
  if (id < 0 || id >= static_cast<int>(sizeof(kEmulated) / sizeof(kEmulated[0])) || block == 0 ||
      block % 32 != 0) {
    return 1;
  }
  try {
    mmreg_emulator::launch(grid_x, grid_y, block, [&] { kEmulated[id](args); });
    return 0;
  } catch (...) {
    return 2;
  }
}
}
