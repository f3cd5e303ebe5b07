"""The prefill's element-wise kernels alone (issue #18): how near the card's copy rate mmreg's SiLU x up,
quick_gelu and residual add + RMSNorm run, and whether lab variants of the first two get nearer.

Run 105's trace put them at about 2.4 TB/s of reads and writes (1.7 for quick_gelu), 11% of LLaVA-1.5's
batch-8 prefill. This times, at LLaVA-1.5's prefill shapes (604 and 4832 rows of the decoder, one and four
images of CLIP-L), each kernel of fused_kernels.cu as launch.rs launches it, beside torch's own kernels
moving the same bytes (an add: two reads and a write; a copy: one of each), and the lab variants below:
one flat grid over every vector of the output (no block half empty at a row's end) with V vectors a thread,
their loads issued before any use, and with ld/st.global.cs (evict-first) or not. One vector a thread
without .cs (run 107's `v1`) is what both landed kernels now are, so it is not timed again. Each variant's
output is checked bit for bit against the landed kernel's, and the landed SiLU x up against HF's ops. Compiled with NVRTC as linear_lab.py compiles them.
Usage on the GPU machine: python3 scripts/gpu/elementwise_lab.py
"""
import ctypes, os, sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from linear_lab import Module, compile_cubin, graph_us, source  # noqa: E402

LAB = r"""
// Loads and stores of 16 bytes, evict-first (.cs) or plain.
template <bool kStream>
__device__ __forceinline__ uint4 lab_load(const u16* p) {
  return kStream ? __ldcs(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
}
template <bool kStream>
__device__ __forceinline__ void lab_store(u16* p, uint4 v) {
  if (kStream) {
    __stcs(reinterpret_cast<uint4*>(p), v);
  } else {
    *reinterpret_cast<uint4*>(p) = v;
  }
}

// silu_mul_vectors over one flat index of the output's vectors (rows * cols / 8), V a thread a round.
template <int V, bool kStream>
__device__ void lab_silu_flat(u16* out, const u16* gate_up, unsigned rows, unsigned cols) {
  typedef Pack<u16, 8> P;
  const unsigned per_row = cols / 8, total = rows * per_row;
  const unsigned stride = gridDim.x * blockDim.x;
  begin_kernel();
  for (unsigned base = blockIdx.x * blockDim.x + threadIdx.x; base < total; base += stride * V) {
    uint4 g[V], u[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const unsigned v = base + i * stride;
      if (v < total) {
        const unsigned r = v / per_row, c = v - r * per_row;
        const u16* gp = gate_up + (size_t)r * 2 * cols + (size_t)c * 8;
        g[i] = lab_load<kStream>(gp);
        u[i] = lab_load<kStream>(gp + cols);
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const unsigned v = base + i * stride;
      if (v < total) {
        const P gv = *reinterpret_cast<const P*>(&g[i]), uv = *reinterpret_cast<const P*>(&u[i]);
        P o;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          o.e[n] = silu_times<BF16>(gv.e[n], uv.e[n]);
        }
        lab_store<kStream>(out + (size_t)v * 8, *reinterpret_cast<const uint4*>(&o));
      }
    }
  }
}

// quick_gelu_vectors with V vectors a thread a round, loads first.
template <int V, bool kStream>
__device__ void lab_gelu(u16* out, const u16* x, unsigned vectors) {
  typedef Pack<u16, 8> P;
  const unsigned stride = gridDim.x * blockDim.x;
  begin_kernel();
  for (unsigned base = blockIdx.x * blockDim.x + threadIdx.x; base < vectors; base += stride * V) {
    uint4 in[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (base + i * stride < vectors) {
        in[i] = lab_load<kStream>(x + (size_t)(base + i * stride) * 8);
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (base + i * stride < vectors) {
        const P iv = *reinterpret_cast<const P*>(&in[i]);
        P o;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          o.e[n] = quick_gelu_of<BF16>(iv.e[n]);
        }
        lab_store<kStream>(out + (size_t)(base + i * stride) * 8, *reinterpret_cast<const uint4*>(&o));
      }
    }
  }
}

#define LAB_VARIANT(V, S, name)                                                                    \
  extern "C" __global__ void lab_silu_##name(u16* out, const u16* gu, unsigned rows, unsigned cols) { \
    lab_silu_flat<V, S>(out, gu, rows, cols);                                                      \
  }                                                                                                \
  extern "C" __global__ void lab_gelu_##name(u16* out, const u16* x, unsigned vectors) {            \
    lab_gelu<V, S>(out, x, vectors);                                                               \
  }
LAB_VARIANT(2, false, v2)
LAB_VARIANT(4, false, v4)
LAB_VARIANT(1, true, v1_cs)
LAB_VARIANT(2, true, v2_cs)
"""
VARIANTS = ["v2", "v4", "v1_cs", "v2_cs"]
BLOCK = 256  # launch.rs's BLOCK


def row(name, us, nbytes, ok="–"):
    print(f"| {name} | {us:.1f} | {nbytes / us / 1e6:.2f} | {ok} |")


def copies_for(nbytes):
    """Enough copies of the inputs (at least 400 MB) that none is read from L2."""
    return max(2, -(-400_000_000 // nbytes))


def main():
    major, minor = torch.cuda.get_device_capability()
    cubin, _ = compile_cubin(source(lab=False) + LAB, f"{major}{minor}")
    mod = Module(cubin)
    u32, i64 = ctypes.c_uint, ctypes.c_longlong
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, {mod.sms} SMs; µs a call (in a CUDA graph, inputs not in L2), "
          "TB/s of reads and writes, output bit-equal to the landed kernel's")

    for rows in (604, 4832):
        cols = 11008
        nbytes = rows * cols * 2 * 3  # gate and up read, out written
        n = copies_for(nbytes)
        gus = [torch.randn(rows, 2 * cols, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        out = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)
        print(f"\n## SiLU x up, {rows} x {cols} (LLaVA-1.5's MLP), {nbytes / 1e6:.0f} MB\n"
              "| kernel | µs | TB/s | equal |\n|---|---|---|---|")
        halves = [(g[:, :cols].contiguous(), g[:, cols:].contiguous()) for g in gus]
        row("torch add (the same bytes)", graph_us(lambda i: torch.add(*halves[i], out=out), n), nbytes)
        del halves
        landed = mod.function("silu_mul_vectors_bf16")
        vectors = cols // 8
        # As launch.rs launches it: one flat grid since run 107 (lab_silu_v1's; a grid of rows before, run
        # 107's "landed" row).
        grid = -(-rows * vectors // BLOCK)

        def go_landed(i):
            mod.launch(landed, grid, BLOCK, [out, gus[i], i64(rows), i64(cols)])
        go_landed(0)
        ref = out.clone()
        g, u = gus[0][:, :cols], gus[0][:, cols:]
        hf = "yes" if torch.equal(ref, torch.nn.functional.silu(g) * u) else "NO"  # HF's act_fn(gate) * up
        row(f"silu_mul_vectors (landed; grid {grid})", graph_us(go_landed, n), nbytes, f"{hf} (HF's ops)")
        for v in VARIANTS:
            f = mod.function(f"lab_silu_{v}")
            per = int(v[1])
            blocks = -(-rows * vectors // (BLOCK * per))
            go = lambda i, f=f, blocks=blocks: mod.launch(f, blocks, BLOCK, [out, gus[i], u32(rows), u32(cols)])
            out.zero_()
            go(0)
            ok = "yes" if torch.equal(out, ref) else "NO"
            row(f"lab_silu_{v} ({blocks} blocks)", graph_us(go, n), nbytes, ok)

    for images in (1, 4):
        rows, cols = 577 * images, 4096
        nbytes = rows * cols * 2 * 2
        n = copies_for(nbytes)
        xs = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        out = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)
        print(f"\n## quick_gelu, {rows} x {cols} (CLIP-L's MLP, {images} image(s)), {nbytes / 1e6:.0f} MB\n"
              "| kernel | µs | TB/s | equal |\n|---|---|---|---|")
        row("torch copy (the same bytes)", graph_us(lambda i: out.copy_(xs[i]), n), nbytes)
        landed = mod.function("quick_gelu_vectors_bf16")
        vectors = rows * cols // 8

        def go_landed(i):
            mod.launch(landed, -(-vectors // BLOCK), BLOCK, [out, xs[i], i64(vectors)])
        go_landed(0)
        ref = out.clone()
        row("quick_gelu_vectors (landed)", graph_us(go_landed, n), nbytes)
        for v in VARIANTS:
            f = mod.function(f"lab_gelu_{v}")
            blocks = -(-vectors // (BLOCK * int(v[1])))
            go = lambda i, f=f, blocks=blocks: mod.launch(f, blocks, BLOCK, [out, xs[i], u32(vectors)])
            out.zero_()
            go(0)
            ok = "yes" if torch.equal(out, ref) else "NO"
            row(f"lab_gelu_{v} ({blocks} blocks)", graph_us(go, n), nbytes, ok)

    for rows in (604, 4832):
        cols = 4096
        nbytes = rows * cols * 2 * 4  # x and delta read, sum and out written
        n = copies_for(nbytes)
        xs = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        ds = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        w = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
        out, total = torch.empty_like(xs[0]), torch.empty_like(xs[0])
        print(f"\n## residual add + RMSNorm, {rows} x {cols}, {nbytes / 1e6:.0f} MB\n"
              "| kernel | µs | TB/s | equal |\n|---|---|---|---|")
        row("torch add + copy (the same bytes)", graph_us(
            lambda i: (torch.add(xs[i], ds[i], out=total), out.copy_(xs[i])), n), nbytes)
        f = mod.function("add_rms_norm_vectors_bf16")
        threads = 32 * -(-(cols // 8 // 4) // 32)  # launch.rs: 4 vectors a thread from 64 rows on
        row(f"add_rms_norm_vectors (landed, {threads} threads a row)", graph_us(
            lambda i: mod.launch(f, rows, threads, [out, total, xs[i], ds[i], w, ctypes.c_int(cols),
                                                    ctypes.c_float(1e-5)]), n), nbytes)


if __name__ == "__main__":
    main()
