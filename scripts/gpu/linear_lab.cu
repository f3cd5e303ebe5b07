// Variants of the decode products for scripts/gpu/linear_lab.py, compiled after csrc/fused_kernels.cu (whose
// templates they instantiate), and a plain read of the weight (the card's rate for that many bytes, the
// roof for the products). Run 57 also timed a cp.async version (each lane's runs copied into shared
// memory 2-7 stages ahead): slower than the register loads at every shape (docs/benchmarks.md).

// Every 16-byte vector of w once (4 loads in flight a thread), XORed so that the loads stay: the XOR of
// the calling thread's share (lab_read; prefetch_lab.cu's stand-in window). (Not in the CPU emulator,
// which scripts/gpu/linear_lab_check.cpp runs the prototype below in.)
#ifndef MMREG_EMULATE
__device__ unsigned lab_read_share(const uint4* w, long long vectors) {
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
  return acc;
}

extern "C" __global__ void lab_read(const uint4* w, long long vectors, unsigned* sink) {
  const unsigned acc = lab_read_share(w, vectors);
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

// Output (row, out)'s sum over every split of k, in order: this split's `sum` and the others' f32 sums in
// `partial` ([split][m][n]; at most 4 splits, their loads issued together).
__device__ __forceinline__ float lab_splits_total(const float* partial, float sum, long long split, int splits,
                                                  int m, long long n, int row, long long out) {
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
  return total;
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
    y[row * n + out] = BF16::store(lab_splits_total(partial, sum, split, splits, m, n, row, out));
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

// A third design for 17-32 rows of x, what cuBLAS's own kernels do at these shapes (run 78's
// lab_rows32_w loaded w into registers and stayed 10-57% behind cuBLAS whatever its loads in flight;
// this one, run 81 on an H100, took 1.2-1.75x cuBLAS's time, behind lab_rows32_w too): w
// and x staged through shared memory by asynchronous copies (cp.async, kStages chunks of k ahead), read
// from it in the mma's fragments by ldmatrix. A block owns kRows rows of w (a tile), each of its warps
// kWarpRows of them (16 or 32: 16 or 32 accumulators a lane for x's 32 rows), and walks one split of k in
// chunks of kChunk elements; x's 32 rows of each chunk are copied once a block, for all its warps. The
// grid is at most the blocks the device holds at once: each block takes the work items (tile, split)
// b, b + grid, ... one after another, its copies running on from one item into the next. Splits of k
// are summed as lab_rows32_w's (the last split to arrive adds every split's f32 sums in order).
//
// Shared memory, each chunk (stage): kRows rows of w, then 32 of x, each of kChunk elements in 16-byte
// pieces; piece c of row r is stored at c ^ (r % 8), so that the 8 rows an ldmatrix reads at once lie
// in different banks. Dynamic: (kRows + 32) · kChunk · 2 · kStages bytes.
#ifdef MMREG_EMULATE
alignas(1024) static unsigned char lab_smem[232448];
namespace mmreg_emulator {
// What ldmatrix.x4 gives the lane: from the 8 rows whose addresses lanes 8i..8i+7 hold (matrix i), the
// 4 bytes at column 4·(lane % 4) of row lane / 4.
inline void ldmatrix_x4(unsigned (&r)[4], const unsigned char* row) {
  unsigned mine[2], all[32][2];
  std::memcpy(mine, &row, sizeof(row));
  warp_gather(mine, all);
  const unsigned lane = thread_idx.x % 32;
  for (int i = 0; i < 4; ++i) {
    const unsigned char* p;
    std::memcpy(&p, all[8 * i + lane / 4], sizeof(p));
    std::memcpy(&r[i], p + 4 * (lane % 4), 4);
  }
}
}  // namespace mmreg_emulator
#else
extern __shared__ __align__(16) unsigned char lab_smem[];

// p's address in the shared window, as cp.async, ldmatrix and wgmma's descriptors take it.
__device__ __forceinline__ unsigned lab_shared_address(const void* p) {
  unsigned address;
  asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(p));
  return address;
}
#endif

// 16 bytes from global src into shared dst, asynchronously; zeros where `real` is false (src unread).
template <bool kEvictFirst>
__device__ __forceinline__ void lab_copy16(unsigned char* dst, const void* src, bool real, unsigned long long policy) {
#ifdef MMREG_EMULATE
  if (real) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
#else
  const unsigned address = lab_shared_address(dst);
  if (kEvictFirst) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;"
                 :: "r"(address), "l"(src), "r"(real ? 16 : 0), "l"(policy));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(address), "l"(src), "r"(real ? 16 : 0));
  }
#endif
}

__device__ __forceinline__ void lab_commit() {
#ifndef MMREG_EMULATE
  asm volatile("cp.async.commit_group;");
#endif
}

// Waits until at most N of the thread's committed groups of copies are still in flight.
template <int N>
__device__ __forceinline__ void lab_wait() {
#ifndef MMREG_EMULATE
  asm volatile("cp.async.wait_group %0;" :: "n"(N));
#endif
}

__device__ __forceinline__ void lab_ldmatrix_x4(unsigned (&r)[4], const unsigned char* row) {
#ifdef MMREG_EMULATE
  mmreg_emulator::ldmatrix_x4(r, row);
#else
  const unsigned address = lab_shared_address(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
#endif
}

// Hopper's warpgroup products (`wgmma`) for lab_rows32_s's kGmma form: both operands read from shared
// memory, where the copies above already store a 64-element chunk of a row as 128 bytes whose 16-byte
// piece c sits at c ^ (row % 8), which is wgmma's 128-byte swizzle of a K-major tile when the stage
// starts on a 1024-byte boundary (the swizzle is a function of the address's bits 4-9). A warpgroup's
// m64n32k16 takes 64 rows of w (A) and x's 32 rows (B), 16 elements of k, and adds to 16 f32 a thread
// (m64n16k16 and m64n8k16: x's 16 or 8 rows, 8 or 4 f32):
// with warp q of the warpgroup and lane (g, t), d[j][0..3] are (w row 16q + g, x row 8j + 2t),
// (16q + g, 8j + 2t + 1), (16q + g + 8, 8j + 2t), (16q + g + 8, 8j + 2t + 1): mma_m16n8k16's layout,
// so lab_each_sum reads them as it reads a warp of lab_rows32_s's 16-row tiles.

// The first 1024-byte boundary at or after p (the stages' base: a wgmma tile's swizzle needs it).
__device__ __forceinline__ unsigned char* lab_align1024(unsigned char* p) {
#ifdef MMREG_EMULATE
  const unsigned long long at = reinterpret_cast<unsigned long long>(p);
#else
  const unsigned at = lab_shared_address(p);
#endif
  return p + ((1024 - (at & 1023)) & 1023);
}

#ifdef MMREG_EMULATE
namespace mmreg_emulator {
// The bf16 at element e of row r of a 128-byte-swizzled K-major tile whose k-step starts at `tile` (its
// 8-row groups 1024 bytes apart), as the hardware finds it: the address's bits 4-6 XORed with bits 7-9.
inline float gmma_element(const unsigned char* tile, int r, int e) {
  const unsigned long long linear = reinterpret_cast<unsigned long long>(tile) + (r / 8) * 1024 + (r % 8) * 128 + 2 * e;
  const unsigned long long swizzled = linear ^ (((linear >> 7) & 7) << 4);
  u16 v;
  std::memcpy(&v, reinterpret_cast<const void*>(swizzled), 2);
  return BF16::load(v);
}
}  // namespace mmreg_emulator
#endif

// d += A · Bᵀ for the warpgroup: A the 64 rows of w at `a`, B the kX rows of x at `b` (8, 16 or 32:
// m64n8k16, m64n16k16 or m64n32k16; d[j] for x rows 8j.. with j < kX / 8), 16 elements of k (each pointer
// a stage's tile plus 32 bytes a k-step).
template <int kX>
__device__ __forceinline__ void lab_gmma(float (&d)[4][4], const unsigned char* a, const unsigned char* b) {
  static_assert(kX == 8 || kX == 16 || kX == 32, "wgmma's n: 8, 16 or 32 rows of x");
#ifdef MMREG_EMULATE
  const int q = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int j = 0; j < kX / 8; ++j) {
    for (int v = 0; v < 4; ++v) {
      const int row = 16 * q + g + (v >= 2 ? 8 : 0), col = 8 * j + 2 * t + (v & 1);
      float sum = d[j][v];
      for (int e = 0; e < 16; ++e) {
        sum += mmreg_emulator::gmma_element(a, row, e) * mmreg_emulator::gmma_element(b, col, e);
      }
      d[j][v] = sum;
    }
  }
#else
  auto descriptor = [](const unsigned char* tile) {
    const unsigned at = lab_shared_address(tile);
    // start address >> 4; leading byte offset 1 (unused by swizzled K-major tiles); stride byte offset
    // 1024 >> 4 (8 rows of 128 bytes); swizzle mode 1 (128 bytes) in bits 62-63.
    return (unsigned long long)((at & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
  };
  const unsigned long long da = descriptor(a), db = descriptor(b);
  if constexpr (kX == 8) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, %4, %5, p, 1, 1, 0, 0;\n}"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
        : "l"(da), "l"(db), "r"(1));
  } else if constexpr (kX == 16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
          "+f"(d[1][3])
        : "l"(da), "l"(db), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
          "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),
          "+f"(d[3][2]), "+f"(d[3][3])
        : "l"(da), "l"(db), "r"(1));
  }
#endif
}

// Before a warpgroup's products: its registers' earlier writes ordered before them (wgmma.fence).
__device__ __forceinline__ void lab_gmma_fence() {
#ifndef MMREG_EMULATE
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}

// After them: commit the group and wait until it is done (the accumulators readable, the stage free).
__device__ __forceinline__ void lab_gmma_commit_and_wait() {
#ifndef MMREG_EMULATE
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#endif
}

// The thread's landed asynchronous copies made visible to the async proxy, which wgmma reads through.
__device__ __forceinline__ void lab_fence_proxy_async() {
#ifndef MMREG_EMULATE
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

template <int kRows, int kWarpRows, int kChunk, int kStages, bool kEvictFirst, bool kGmma = false, int kX = 32>
__device__ void lab_rows32_s(u16* y, const u16* x, const u16* w, float* partial, int m, long long n, long long k,
                             int splits) {
  constexpr int kTiles = kWarpRows / 16;           // a warp's 16-row tiles of w
  constexpr int kPieces = kChunk / 8;              // 16-byte pieces of a row's chunk
  constexpr int kRowBytes = kChunk * 2;
  constexpr int kStageBytes = (kRows + kX) * kRowBytes;  // (kX: x's rows a stage holds, 32 but in kGmma's)
  constexpr int kThreads = kRows / kWarpRows * 32;
  static_assert(kPieces >= 8 && kRows % kWarpRows == 0, "a chunk of at least 64 elements");
  static_assert(!kGmma || (kWarpRows == 16 && kChunk == 64 && kRows % 64 == 0),
                "wgmma: a warpgroup a 64 rows of w, chunks of one 128-byte swizzle row");
  static_assert(kX == 32 || kGmma, "mma.sync's form: x's 32 rows");
  // (wgmma's swizzled tiles: stages from a 1024-byte boundary, kStageBytes a multiple of 1024)
  unsigned char* const smem = kGmma ? lab_align1024(lab_smem) : lab_smem;
  __shared__ unsigned last_shared;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long long chunks = (k + kChunk - 1) / kChunk;
  const long long items = (n + kRows - 1) / kRows * splits;
  unsigned long long policy = 0;
#ifndef MMREG_EMULATE
  if (kEvictFirst) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  }
#endif
  auto piece = [&](int stage, int row, int c) -> unsigned char* {
    return smem + stage * kStageBytes + row * kRowBytes + ((c ^ (row & 7)) * 16);
  };
  // The copies' walk over (item, chunk) runs kStages - 1 chunks ahead of the products'.
  long long load_item = blockIdx.x, load_chunk = 0, load_end = 0;
  auto item_chunks = [&](long long item, long long& begin, long long& end) {
    const long long split = item % splits;
    begin = split * chunks / splits;
    end = (split + 1) * chunks / splits;
  };
  // (past any item with no chunk: a split of fewer chunks than splits)
  auto skip_empty = [&]() {
    while (load_item < items && load_chunk == load_end) {
      load_item += gridDim.x;
      item_chunks(load_item, load_chunk, load_end);
    }
  };
  item_chunks(load_item, load_chunk, load_end);
  skip_empty();
  auto issue = [&](int stage) {
    if (load_item < items) {
      const long long first = load_item / splits * kRows;
      for (int i = threadIdx.x; i < (kRows + kX) * kPieces; i += kThreads) {
        const int row = i / kPieces, c = i % kPieces;
        const long long at = load_chunk * kChunk + c * 8;
        const u16* src;
        bool real;
        if (row < kRows) {
          real = first + row < n && at < k;
          src = w + min(first + row, n - 1) * k + (real ? at : 0);
        } else {
          real = row - kRows < m && at < k;
          src = x + min((long long)(row - kRows), (long long)m - 1) * k + (real ? at : 0);
        }
        if (kEvictFirst && row < kRows) {  // (x's rows, read by every block, stay)
          lab_copy16<true>(piece(stage, row, c), src, real, policy);
        } else {
          lab_copy16<false>(piece(stage, row, c), src, real, policy);
        }
      }
      ++load_chunk;
      skip_empty();
    }
    lab_commit();  // (an empty group past the last item, so that the waits' counts hold)
  };
#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) {
    issue(s);
  }
  int stage = 0;
  float c[kTiles][4][4] = {};
#pragma unroll 1
  for (long long item = blockIdx.x; item < items; item += gridDim.x) {
    long long begin, end;
    item_chunks(item, begin, end);
#pragma unroll 1
    for (long long chunk = begin; chunk < end; ++chunk) {
      lab_wait<kStages - 2>();
      if (kGmma) {
        lab_fence_proxy_async();
      }
      __syncthreads();  // this stage's copies landed for every thread; the stage before is free again
      issue((stage + kStages - 1) % kStages);
      if constexpr (kGmma) {
        // The warpgroup's 64 rows of w (warp w holds rows 16w.., as a warp's tile below) against x's kX.
        lab_gmma_fence();
#pragma unroll
        for (int step = 0; step < 4; ++step) {
          lab_gmma<kX>(c[0], piece(stage, warp / 4 * 64, 2 * step), piece(stage, kRows, 2 * step));
        }
        lab_gmma_commit_and_wait();
      } else {
#pragma unroll
        for (int step = 0; step < kChunk / 16; ++step) {
          const int i = lane / 8, r8 = lane % 8;
          unsigned a[kTiles][4], b[4][2];
#pragma unroll
          for (int tile = 0; tile < kTiles; ++tile) {
            lab_ldmatrix_x4(a[tile], piece(stage, warp * kWarpRows + tile * 16 + (i & 1) * 8 + r8, 2 * step + (i >> 1)));
          }
#pragma unroll
          for (int pair = 0; pair < 2; ++pair) {
            unsigned r[4];
            lab_ldmatrix_x4(r, piece(stage, kRows + (2 * pair + (i >> 1)) * 8 + r8, 2 * step + (i & 1)));
            b[2 * pair][0] = r[0];
            b[2 * pair][1] = r[1];
            b[2 * pair + 1][0] = r[2];
            b[2 * pair + 1][1] = r[3];
          }
#pragma unroll
          for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              mma_m16n8k16<BF16>(c[tile][j], a[tile], b[j]);
            }
          }
        }
      }
      stage = (stage + 1) % kStages;
    }
    // The item's sums: to y, or with k split, to `partial` and (the last split) to y in order.
    const long long part = item / splits, split = item % splits;
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
      const long long first = part * kRows + warp * kWarpRows + tile * 16;
      if (splits > 1) {
        lab_each_sum(c[tile], first, lane, m, n, [&](float sum, int row, long long out) {
          partial[(split * (long long)m + row) * n + out] = sum;
        });
      }
    }
    bool last = true;
    if (splits > 1) {
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) {
        last_shared = atomicAdd(&lab_arrivals[part], 1u) == (unsigned)splits - 1;
      }
      __syncthreads();
      last = last_shared;
      if (last) {
        __threadfence();
      }
    }
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
      const long long first = part * kRows + warp * kWarpRows + tile * 16;
      if (last) {
        lab_each_sum(c[tile], first, lane, m, n, [&](float sum, int row, long long out) {
          y[row * n + out] = BF16::store(lab_splits_total(partial, sum, split, splits, m, n, row, out));
        });
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          c[tile][j][q] = 0.0f;
        }
      }
    }
    if (splits > 1 && last && threadIdx.x == 0) {
      lab_arrivals[part] = 0;
    }
  }
  lab_wait<0>();  // (the empty groups)
}

// lab_rows32_s_n{R}_w{W}_k{K}_s{S}{_e}: kRows = R, kWarpRows = W, kChunk = K, kStages = S, _e: w's copies
// marked evict-first in L2 (x and the partial sums stay). Launched with R / W · 32 threads and
// (R + 32) · K · 2 · S bytes of dynamic shared memory, at most as many blocks as the device holds.
#define LAB_ROWS32_S(R, W, K, S, E, suffix)                                                                  \
  extern "C" __global__ void __launch_bounds__(R / W * 32) lab_rows32_s_n##R##_w##W##_k##K##_s##S##suffix( \
      u16* y, const u16* x, const u16* w, float* partial, int m, long long n, long long k, int splits) {      \
    lab_rows32_s<R, W, K, S, E>(y, x, w, partial, m, n, k, splits);                                         \
  }
LAB_ROWS32_S(128, 32, 64, 4, false, )
LAB_ROWS32_S(128, 16, 64, 4, false, )
LAB_ROWS32_S(64, 16, 64, 6, false, )
LAB_ROWS32_S(128, 32, 128, 3, false, )
LAB_ROWS32_S(128, 32, 64, 4, true, _e)

// lab_g_x{X}_n{R}_w16_k64_s{S}{_e}: lab_rows32_s's copies with wgmma's products (kGmma) for up to X rows of x
// (8, 16 or 32), a warpgroup a 64 rows of w: R · 2 threads, (R + X) · 128 · S + 1024 bytes of dynamic
// shared memory (the 1024 for the stages' alignment); _e: w's copies marked evict-first in L2. sm_90a only.
#if defined(MMREG_EMULATE) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LAB_G(X, R, S, E, suffix)                                                                         \
  extern "C" __global__ void __launch_bounds__(R * 2) lab_g_x##X##_n##R##_w16_k64_s##S##suffix(          \
      u16* y, const u16* x, const u16* w, float* partial, int m, long long n, long long k, int splits) {    \
    lab_rows32_s<R, 16, 64, S, E, true, X>(y, x, w, partial, m, n, k, splits);                            \
  }
LAB_G(32, 64, 8, false, )
LAB_G(32, 128, 4, false, )
LAB_G(32, 128, 6, false, )
LAB_G(32, 256, 4, false, )
LAB_G(32, 128, 6, true, _e)
LAB_G(16, 64, 8, false, )
LAB_G(16, 128, 6, false, )
LAB_G(8, 64, 8, false, )
LAB_G(8, 128, 6, false, )
LAB_G(8, 128, 6, true, _e)
#endif
