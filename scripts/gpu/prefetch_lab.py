"""Can the next product's weights come into L2 while a batch-1 decode step waits on latency? (issue #18)

At batch 1 a layer spends ~11 µs in attention and its combine reading ~12 MB (about 1 TB/s, run 111),
and ~3 µs in each of two norms reading nothing much: the memory is mostly idle while the products, which
follow, read their weights at 79-97% of the card's rate. This lab times, in a CUDA graph over enough
copies of each weight that none stays in L2 between calls, pairs of
  lab_window (prefetch_lab.cu: a stand-in for the phase, reading `KV_MB` and lasting `window` µs, and
             first asking for the first P MB of the next weight to come into L2 in one of three ways)
  linear_few_rows_8_bf16 at one row (the engine's batch-1 product) on that weight,
and reports µs per pair against P = 0. Usage on the GPU machine: python3 scripts/gpu/prefetch_lab.py
"""
import ctypes, os, sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_lab as lab  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = {0: "none", 1: "bulk", 2: "bulk evict_last", 3: "lines evict_last"}
# (weight, window µs, KV MB read in the window, prefetch MB to try): o_proj after attention + combine,
# q/k/v and gate/up after a norm.
# A size "MB/f" takes the first fraction f of each 16-row tile of the weight (the engine's tile of a
# block) until MB are asked for, rather than a prefix of the weight.
CASES = [(c.split(":")[0], float(c.split(":")[1]), float(c.split(":")[2]), c.split(":")[3].split(","))
         for c in os.environ.get("CASES", "o_proj:11:12:8,16,24,16/0.5,24/0.75,33.5/0.5;qkv:3:0:8,8/0.25,12/0.25;"
                                 "gate_up:3:0:8,8/0.125,12/0.125").split(";")]


def main():
    major, minor = torch.cuda.get_device_capability()
    text = lab.source() + open(os.path.join(HERE, "prefetch_lab.cu")).read()  # (linear_lab.cu's read)
    cubin, _ = lab.compile_cubin(text, f"{major}{minor}")
    mod = lab.Module(cubin)
    window = mod.function("lab_window")
    product = mod.function("linear_few_rows_8_bf16")
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {mod.sms} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    piece = int(os.environ.get("PIECE", 32768))
    blocks = int(os.environ.get("WINDOW_BLOCKS", 384))
    print("| weight | window µs | KV MB | prefetch MB | how | µs a pair | against none |\n|---|---|---|---|---|---|---|")
    for shape, window_us, kv_mb, sizes in CASES:
        n, k = lab.SHAPES[shape]
        nbytes = n * k * 2
        copies = max(3, -(-400_000_000 // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        kv_vectors = int(kv_mb * 1e6) // 16
        kvs = [torch.empty(max(kv_vectors, 1) * 8, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)

        def pair(i, mode, size, with_window=True, with_product=True):
            mb, fraction = (float(v) for v in (str(size).split("/") + ["1"])[:2])
            asked = min(int(mb * 1e6), nbytes)
            period = 16 * k * 2  # a block's tile of the weight
            if with_window:
                mod.launch(window, blocks, 128, [kvs[i], ctypes.c_longlong(kv_vectors), ws[i],
                                                 ctypes.c_longlong(min(int(asked / fraction), nbytes)),
                                                 ctypes.c_int(mode), ctypes.c_int(piece),
                                                 ctypes.c_longlong(int(window_us * 1000)), sink,
                                                 ctypes.c_longlong(period), ctypes.c_longlong(int(period * fraction))])
            if with_product:
                mod.launch(product, -(-n // 16), 256, [y, x, ws[i], ctypes.c_void_p(0), ctypes.c_int(1),
                                                       ctypes.c_longlong(n), ctypes.c_longlong(k)])

        alone = lab.graph_us(lambda i: pair(i, 0, 0, with_window=False), copies)
        idle = lab.graph_us(lambda i: pair(i, 0, 0, with_product=False), copies)
        base = lab.graph_us(lambda i: pair(i, 0, 0), copies)
        print(f"| {shape} alone | – | – | – | – | {alone:.1f} | |")
        print(f"| window alone | {window_us} | {kv_mb} | – | – | {idle:.1f} | |")
        print(f"| {shape} | {window_us} | {kv_mb} | 0 | none | {base:.1f} | |")
        for mb in sizes:
            for mode in (1, 2, 3):
                us = lab.graph_us(lambda i: pair(i, mode, mb), copies)
                print(f"| {shape} | {window_us} | {kv_mb} | {mb} | {MODES[mode]} | {us:.1f} | {us - base:+.1f} |")
            sys.stdout.flush()
        del ws, kvs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
