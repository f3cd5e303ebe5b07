// Lab kernels for scripts/gpu/prefetch_lab.py, compiled after csrc/fused_kernels.cu and linear_lab.cu:
// can the weights of the next product come into L2 while a decode step waits on latency (batch 1's
// attention and combine, the norms), so that the product then reads part of them from L2?
//
// lab_window stands in for such a phase: each block reads its share of `kv` (the attention's keys and
// values), then spins until `ns` nanoseconds have passed since it started. Before that, with mode != 0,
// the block asks for its share of the first `next_bytes` of `next` to come into L2:
//   1: cp.async.bulk.prefetch.L2 (the copy engine of sm_90: one instruction per `piece` bytes, from the
//      lanes of warp 0),
//   2: the same with an evict_last cache policy,
//   3: prefetch.global.L2::evict_last, one instruction per 128-byte line, from every thread.
#ifndef MMREG_EMULATE
__device__ __forceinline__ unsigned long long lab_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

extern "C" __global__ void lab_window(const uint4* kv, long long kv_vectors, const char* next,
                                      long long next_bytes, int mode, int piece, long long ns,
                                      unsigned* sink, long long period, long long take) {
  // The bytes asked for: the first `take` of each `period` of next's first `next_bytes` (all of them
  // when take = period), periods dealt to the blocks in turn.
  const unsigned long long start = lab_now();
  const long long periods = (next_bytes + period - 1) / period;
  unsigned long long policy = 0;
  if (mode == 2) {
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  }
  for (long long p = blockIdx.x; mode != 0 && p < periods; p += gridDim.x) {
    const long long first = p * period, last = min(first + take, min(first + period, next_bytes));
    if ((mode == 1 || mode == 2) && threadIdx.x < 32) {
      for (long long at = first + (long long)threadIdx.x * piece; at < last; at += 32LL * piece) {
        const unsigned size = (unsigned)min((long long)piece, last - at) / 16 * 16;
        if (size == 0) {
          continue;
        }
        if (mode == 1) {
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(next + at), "r"(size) : "memory");
        } else {
          asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(next + at),
                       "r"(size), "l"(policy)
                       : "memory");
        }
      }
    } else if (mode == 3) {
      for (long long at = first + (long long)threadIdx.x * 128; at < last; at += (long long)blockDim.x * 128) {
        asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(next + at));
      }
    }
  }
  const unsigned acc = lab_read_share(kv, kv_vectors);
  while (lab_now() - start < (unsigned long long)ns) {
  }
  if (acc == 0x9e3779b9u) {
    sink[0] = acc;
  }
}
#endif
