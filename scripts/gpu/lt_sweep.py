"""cuBLASLt's configurations for the decode products, timed one by one (issue #18, batch 32).

libtorch's `F.linear` at 17-32 rows takes cuBLAS's heuristic pick: in run 64's batch-32 trace q/k/v read at
3.5 TB/s (96 tiles for 132 SMs), o_proj at 2.5 and down at 3.4 (split-K and a separate reduce), where a plain
read reaches 4.2. This script asks cuBLASLt (through ctypes, torch's own libcublasLt) for its heuristic's
candidates, then varies the best of them (tile, split-K and reduction scheme, stages), checks each with
cublasLtMatmulAlgoCheck, and times each inside a CUDA graph over enough copies of the weight that none stays
in L2, as linear_lab.py times the engine's kernels. Each candidate's output is checked against an f32
product. Prints a table per shape: F.linear, cuBLASLt's first heuristic pick, and the fastest few.
Usage on the GPU machine: python3 scripts/gpu/lt_sweep.py   (SETS=decode,prefill,vision (below); ROWS=32
  overrides every set's rows; SHAPES=o_proj,down keeps those names; TOP=6 heuristic picks varied;
  JSON=FILE writes every timing)
"""
import ctypes, json, os, sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from linear_lab import SHAPES, graph_us  # noqa: E402

# (name, out features, in features, bias) and the rows each set is timed at: LLaVA-1.5-7B's decoder at
# batch 32's decode, at a lone prefill (604 tokens, its graph's 608 rows) and at batch 8's 4832; CLIP-L/336's
# layers and LLaVA's projector at one and at eight images.
SETS = {
    "decode": ([(n, *SHAPES[n], False) for n in ("qkv", "o_proj", "gate_up", "down", "lm_head")], [32]),
    "prefill": ([(n, *SHAPES[n], False) for n in ("qkv", "o_proj", "gate_up", "down")], [608, 4832]),
    "vision": ([("clip_qkv", 3072, 1024, True), ("clip_o", 1024, 1024, True), ("clip_fc1", 4096, 1024, True),
                ("clip_fc2", 1024, 4096, True), ("projector_1", 4096, 1024, True),
                ("projector_2", 4096, 4096, True)], [577, 4616]),
}

# cublasLt.h / library_types.h / cublas_api.h (CUDA 13).
COMPUTE_32F, R_32F, R_16BF = 68, 0, 14
OP_T = 1
DESC_TRANSA = 3
PREF_MAX_WORKSPACE = 1
CAP_SPLITK, CAP_REDUCTION_MASK, CAP_TILE_IDS, CAP_STAGES_IDS = 0, 1, 6, 13
DESC_EPILOGUE, DESC_BIAS_POINTER, EPILOGUE_BIAS = 7, 8, 4
CFG_ID, CFG_TILE, CFG_SPLITK, CFG_REDUCTION, CFG_SWIZZLE, CFG_CUSTOM, CFG_STAGES, CFG_INNER, CFG_CLUSTER = range(9)
REDUCTIONS = {1: "inplace", 2: "compute", 4: "output"}
TILES = {1: "8x8", 2: "8x16", 3: "16x8", 4: "8x32", 5: "16x16", 6: "32x8", 7: "8x64", 8: "16x32", 9: "32x16",
         10: "64x8", 11: "32x32", 12: "32x64", 13: "64x32", 14: "32x128", 15: "64x64", 16: "128x32",
         17: "64x128", 18: "128x64", 19: "64x256", 20: "128x128", 21: "256x64", 22: "64x512", 23: "128x256",
         24: "256x128", 25: "512x64", 26: "64x96", 27: "96x64", 28: "96x128", 29: "128x160", 30: "160x128",
         31: "192x128", 32: "128x192", 33: "128x96", 34: "32x256", 35: "256x32"}
WORKSPACE = 64 << 20


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def lt_lib():
    path = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "lib", "libcublasLt.so.13")
    return ctypes.CDLL(path)


class Lt:
    """One product y[m, n] = x[m, k] · w[n, k]ᵀ as torch asks cuBLAS for it: column-major D[n, m] =
    op(A)ᵀ with A = w seen as k x n, B = x seen as k x m."""

    def __init__(self, lib, handle, m, n, k, bias=None):
        self.lib, self.handle = lib, handle
        self.desc = ctypes.c_void_p()
        self.check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, R_32F))
        op = ctypes.c_int(OP_T)
        self.check(lib.cublasLtMatmulDescSetAttribute(self.desc, DESC_TRANSA, ctypes.byref(op), ctypes.c_size_t(4)))
        if bias is not None:  # as libtorch's addmm asks for it: the bias added in the product's epilogue
            epilogue, pointer = ctypes.c_uint32(EPILOGUE_BIAS), ctypes.c_void_p(bias.data_ptr())
            self.check(lib.cublasLtMatmulDescSetAttribute(self.desc, DESC_EPILOGUE, ctypes.byref(epilogue),
                                                          ctypes.c_size_t(4)))
            self.check(lib.cublasLtMatmulDescSetAttribute(self.desc, DESC_BIAS_POINTER, ctypes.byref(pointer),
                                                          ctypes.c_size_t(8)))
        self.a, self.b, self.d = (self.layout(r, c, ld) for r, c, ld in ((k, n, k), (k, m, k), (n, m, n)))
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def check(status):
        assert status == 0, f"cuBLASLt status {status}"

    def layout(self, rows, cols, ld):
        out = ctypes.c_void_p()
        self.check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(out), R_16BF, ctypes.c_uint64(rows),
                                                       ctypes.c_uint64(cols), ctypes.c_int64(ld)))
        return out

    def heuristics(self, count):
        pref = ctypes.c_void_p()
        self.check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)))
        ws = ctypes.c_uint64(WORKSPACE)
        self.check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE, ctypes.byref(ws),
                                                                 ctypes.c_size_t(8)))
        results = (Heuristic * count)()
        got = ctypes.c_int()
        self.check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.d, self.d,
                                                           pref, count, results, ctypes.byref(got)))
        return [Algo.from_buffer_copy(results[i].algo) for i in range(got.value) if results[i].state == 0]

    def workspace_of(self, algo):
        """cublasLtMatmulAlgoCheck's workspace bytes, or None when the configuration does not run here."""
        result = Heuristic()
        if self.lib.cublasLtMatmulAlgoCheck(self.handle, self.desc, self.a, self.b, self.d, self.d,
                                            ctypes.byref(algo), ctypes.byref(result)) != 0:
            return None
        return result.workspace if result.workspace <= WORKSPACE else None

    def run(self, algo, w, x, y, ws):
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self.check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()), self.a,
            ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta), ctypes.c_void_p(y.data_ptr()), self.d,
            ctypes.c_void_p(y.data_ptr()), self.d, ctypes.byref(algo), ctypes.c_void_p(ws.data_ptr()),
            ctypes.c_size_t(WORKSPACE), stream))


def get(lib, algo, attr, ctype=ctypes.c_uint32):
    v, written = ctype(), ctypes.c_size_t()
    assert lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v),
                                                    ctypes.c_size_t(ctypes.sizeof(v)), ctypes.byref(written)) == 0
    return v.value


def put(lib, algo, attr, value, ctype=ctypes.c_uint32):
    v = ctype(value)
    return lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(algo), attr, ctypes.byref(v),
                                                    ctypes.c_size_t(ctypes.sizeof(v))) == 0


def caps(lib, algo, attr):
    """A capability array (tile or stages ids) of the algo."""
    written = ctypes.c_size_t()
    lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, None, ctypes.c_size_t(0), ctypes.byref(written))
    n = written.value // 4
    if n == 0:
        return []
    buf = (ctypes.c_uint32 * n)()
    lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, buf, ctypes.c_size_t(n * 4), ctypes.byref(written))
    return list(buf)


def cap(lib, algo, attr):
    v, written = ctypes.c_uint32(), ctypes.c_size_t()
    lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), ctypes.c_size_t(4),
                                          ctypes.byref(written))
    return v.value


def describe(lib, algo):
    splitk = get(lib, algo, CFG_SPLITK, ctypes.c_int32)
    return {"id": get(lib, algo, CFG_ID, ctypes.c_int32), "tile": TILES.get(get(lib, algo, CFG_TILE),
                                                                            str(get(lib, algo, CFG_TILE))),
            "splitk": splitk, "reduction": REDUCTIONS.get(get(lib, algo, CFG_REDUCTION), "none") if splitk > 1
            else "none", "stages": get(lib, algo, CFG_STAGES), "swizzle": get(lib, algo, CFG_SWIZZLE),
            "cluster": get(lib, algo, CFG_CLUSTER, ctypes.c_uint16),
            "inner": get(lib, algo, CFG_INNER, ctypes.c_uint16), "custom": get(lib, algo, CFG_CUSTOM)}


def variants(lib, base, m):
    """The heuristic pick `base` with its tile (those m's rows fit in one to four column tiles of), split-K
    and reduction scheme varied; its stages kept."""
    tiles = [t for t in caps(lib, base, CAP_TILE_IDS) if t in TILES
             and (m > 64 or m <= int(TILES[t].split("x")[1]) * 4 and int(TILES[t].split("x")[1]) <= max(2 * m, 16))]
    # (split-K for a few rows, where the products read; at prefill's rows they compute, and two splits at most)
    splits = ([1, 2, 3, 4, 6, 8, 12, 16] if m <= 64 else [1, 2]) if cap(lib, base, CAP_SPLITK) else [1]
    reductions = [r for r in REDUCTIONS if cap(lib, base, CAP_REDUCTION_MASK) & r]
    for tile in tiles or [get(lib, base, CFG_TILE)]:
        for splitk in splits:
            for red in (reductions if splitk > 1 else [0]):
                a = Algo.from_buffer_copy(base)
                if put(lib, a, CFG_TILE, tile) and put(lib, a, CFG_SPLITK, splitk, ctypes.c_int32) and \
                        put(lib, a, CFG_REDUCTION, red):
                    yield a


def stage_variants(lib, base):
    """`base` with each of its algo's stages."""
    for stage in caps(lib, base, CAP_STAGES_IDS):
        a = Algo.from_buffer_copy(base)
        if put(lib, a, CFG_STAGES, stage):
            yield a


def main():
    lib = lt_lib()
    handle = ctypes.c_void_p()
    Lt.check(lib.cublasLtCreate(ctypes.byref(handle)))
    sets = os.environ.get("SETS", "decode,prefill,vision").split(",")
    only = [n for n in os.environ.get("SHAPES", "").split(",") if n]
    top = int(os.environ.get("TOP", "6"))
    ws = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuBLASLt {lib.cublasLtGetVersion()}")
    record = {"device": torch.cuda.get_device_name(), "shapes": []}
    jobs = [(shape, rows) for set_ in sets for shape in SETS[set_][0] for rows in [SETS[set_][1]]
            if not only or shape[0] in only]
    for (shape, n, k, has_bias), rows in jobs:
        if os.environ.get("ROWS"):
            rows = [int(r) for r in os.environ["ROWS"].split(",")]
        nbytes = n * k * 2
        copies = max(2, -(-400_000_000 // nbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ weights[0].float().T + (bias.float() if has_bias else 0)
            scale = ref.abs().max().item()
            # Prefill's products compute rather than read: 8 calls a graph over two copies, the best of 2.
            many = m > 64
            uses = 2 if many else copies

            def timing(launch):
                return graph_us(launch, uses, reps=2, calls=8 if many else None)
            lt = Lt(lib, handle, m, n, k, bias)
            torch_us = timing(lambda i: F.linear(x, weights[i % uses], bias))
            picks = lt.heuristics(32)
            seen, timings = set(), []

            def timed(algo, source):
                key = bytes(algo.data)
                if key in seen or lt.workspace_of(algo) is None:
                    return
                seen.add(key)
                y.zero_()
                try:
                    lt.run(algo, weights[0], x, y, ws)
                    torch.cuda.synchronize()
                except AssertionError:
                    return
                err = (y.float() - ref).abs().max().item() / scale
                if err > 2e-2:  # a configuration that computes something else is not a candidate
                    print(f"  wrong output ({err:.1e}): {describe(lib, algo)}")
                    return
                us = timing(lambda i: lt.run(algo, weights[i % uses], x, y, ws))
                timings.append({"us": us, "tbs": nbytes / us / 1e6, "source": source, "err": err,
                                "algo": list(algo.data), **describe(lib, algo)})

            for i, algo in enumerate(picks):
                timed(algo, f"heuristic {i}")
            first = timings[0] if timings else None
            for base in [Algo.from_buffer_copy(p) for p in picks[:top]]:
                for algo in variants(lib, base, m):
                    timed(algo, "variant")
            timings.sort(key=lambda t: t["us"])
            for best in [Algo((ctypes.c_uint64 * 8)(*t["algo"])) for t in timings[:3]]:
                for algo in stage_variants(lib, best):
                    timed(algo, "stages")
            # The fastest again, each timed a second time in this order (the first pass's order drifts).
            timings.sort(key=lambda t: t["us"])
            for t in timings[:8]:
                algo = Algo((ctypes.c_uint64 * 8)(*t["algo"]))
                t["us"] = min(t["us"], timing(lambda i: lt.run(algo, weights[i % uses], x, y, ws)))
                t["tbs"] = nbytes / t["us"] / 1e6
            torch_us = min(torch_us, timing(lambda i: F.linear(x, weights[i % uses], bias)))
            timings.sort(key=lambda t: t["us"])
            print(f"\n## {shape} ({n} x {k}{', bias' if has_bias else ''}, {nbytes / 1e6:.1f} MB), {m} rows: "
                  f"{len(timings)} configurations")
            print("| what | µs | TB/s | id | tile | split-K | reduction | stages | cluster | swizzle |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            print(f"| F.linear (libtorch) | {torch_us:.1f} | {nbytes / torch_us / 1e6:.2f} | | | | | | | |")
            for label, t in ([("heuristic's first", first)] if first else []) + \
                    [(f"#{i + 1} ({t['source']})", t) for i, t in enumerate(timings[:8])]:
                print(f"| {label} | {t['us']:.1f} | {t['tbs']:.2f} | {t['id']} | {t['tile']} | {t['splitk']} | "
                      f"{t['reduction']} | {t['stages']} | {t['cluster']} | {t['swizzle']} |")
            record["shapes"].append({"shape": shape, "n": n, "k": k, "bias": has_bias, "rows": m,
                                     "torch_us": torch_us, "timings": timings})
            del x, y
        del weights
        torch.cuda.empty_cache()
    if os.environ.get("JSON"):
        json.dump(record, open(os.environ["JSON"], "w"), indent=1)


if __name__ == "__main__":
    main()
