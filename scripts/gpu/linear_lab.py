"""Decode products alone, kernel by kernel (issue #18): mmreg's product kernels and variants of them
(scripts/gpu/linear_lab.cu), cuBLAS (torch's F.linear) and a plain read of the same weight, timed on
LLaVA-1.5-7B's weight shapes at a few rows of x. Each kernel is compiled with NVRTC as the engine does
(same options), launched through the driver API on torch's stream, checked against an f32 product, and
timed inside a CUDA graph over enough copies of the weight that none stays in L2 (so each call reads its
weight from memory, as a decoder's layers do).
Usage on the GPU machine: python3 scripts/gpu/linear_lab.py [--compile-only (CUBIN=FILE writes it)]
  ROWS=1,8,16,32 the rows of x (17-32 time linear_lab.cu's lab_rows32_s prototypes instead of the
  few-rows kernels, k in 1-4 splits, and with ROWS32_W=1 its lab_rows32_w; on Hopper, every count also
  times its wgmma prototypes, lab_g_x{8,16,32}); SHAPES=o_proj,down (names below); VARIANTS="MMREG_FEW_UNROLL=2|
  MMREG_FEW_WARPS=4,MMREG_FEW_UNROLL=8" also times the few-rows kernels compiled with each entry's
  defines; LANDED=FILE also times those of another version of fused_kernels.cu (say the last commit's).
Prints a table per shape: µs per call and the read rate (weight bytes / time).
"""
import ctypes, os, re, sys, time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCE = os.path.join(ROOT, "mmreg-engine", "csrc", "fused_kernels.cu")
if not os.path.exists(SOURCE):  # staged copy of scripts/gpu (gpu-stage/scripts) run from the repo root
    SOURCE = os.path.join("mmreg-engine", "csrc", "fused_kernels.cu")
LAB = os.path.join(HERE, "linear_lab.cu")

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}
FEW_TILE = 16  # launch.rs's FEW_ROWS_TILE


def nvrtc_lib():
    lib = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "lib")
    ctypes.CDLL(os.path.join(lib, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(os.path.join(lib, "libnvrtc.so.13"))


def compile_cubin(source, arch):
    nvrtc = nvrtc_lib()
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"lab.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17", b"--fmad=false", b"--ptxas-options=--verbose"]
    ok = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) == 0
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if not ok:
        sys.exit(log.value.decode())
    nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    return cubin, log.value.decode()


def registers(log):
    """ptxas's registers and spills per lab kernel, from the verbose log."""
    out, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name] = int(m.group(1))
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and name and int(m.group(1)):
            out[name + " spills"] = int(m.group(1))
    return out


def source(path=SOURCE, lab=True):
    # (A first line of its own each run: NVRTC may serve a source it has compiled before from a cache,
    # without ptxas's report of registers.)
    text = f"// {time.time_ns()}\n" + open(path).read()
    # bf16 alone: the f32 and f16 instantiations only slow the compile.
    text = text.replace("MMREG_KERNELS(F32, f32)\n", "").replace("MMREG_KERNELS(F16, f16)\n", "")
    return text + (open(LAB).read() if lab else "")


class Module:
    def __init__(self, cubin):
        self.cuda = ctypes.CDLL("libcuda.so.1")
        torch.zeros(1, device="cuda")  # the primary context, current
        self.module = ctypes.c_void_p()
        assert self.cuda.cuModuleLoadData(ctypes.byref(self.module), cubin) == 0
        count = ctypes.c_int()
        self.cuda.cuDeviceGetAttribute(ctypes.byref(count), 16, 0)  # multiprocessors
        self.sms = count.value

    def function(self, name):
        f = ctypes.c_void_p()
        status = self.cuda.cuModuleGetFunction(ctypes.byref(f), self.module, name.encode())
        assert status == 0, (name, status)
        return f

    def resident(self, f, threads, smem=0):
        blocks = ctypes.c_int()
        self.cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(blocks), f, threads, ctypes.c_size_t(smem))
        return blocks.value

    def allow_smem(self, f, smem):
        """Lets f take `smem` bytes of dynamic shared memory (past the default 48 KB)."""
        status = self.cuda.cuFuncSetAttribute(f, 8, smem)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        assert status == 0, status

    def launch(self, f, grid, threads, args, smem=0):
        """`grid`: blocks along x, or (x, y)."""
        gx, gy = grid if isinstance(grid, tuple) else (grid, 1)
        holders = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        status = self.cuda.cuLaunchKernel(f, gx, gy, 1, threads, 1, 1, smem, stream, params, None)
        assert status == 0, status


def graph_us(launch, copies, reps=3, calls=None):
    """µs per call: `launch(i)` for copies * 10 calls (or `calls`) in a CUDA graph, the best of `reps`
    replays."""
    calls = calls or copies * max(1, 40 // copies)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):  # warm (and lazy init) outside the capture
            launch(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            launch(i % copies)
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1000 / calls)
    return best


def measure(go, title, name, regs, y, ref, scale, copies, nbytes, resident):
    """One table row: `go(i)` (a launch on copy i of the weight into y) checked against `ref` and timed."""
    y.zero_()
    go(0)
    torch.cuda.synchronize()
    err = (y.float() - ref).abs().max().item() / scale
    us = graph_us(go, copies)
    spill = f", spills {regs[name + ' spills']}" if name + " spills" in regs else ""
    print(f"| {title} ({regs.get(name)} regs{spill}) | {y.shape[0]} | {us:.1f} | {nbytes / us / 1e6:.2f} | "
          f"{err:.1e} | {resident} |")


def persistent(mod, regs, name, rows, threads, smem, ws, x, y, partial, ref, scale, copies, nbytes):
    """A persistent prototype (`rows` rows of w a work item) with its dynamic shared memory, on at most
    the blocks the device holds, k in 1-4 splits: a table row each."""
    m, k = x.shape
    n = ws[0].shape[0]
    f = mod.function(name)
    mod.allow_smem(f, smem)
    resident = mod.resident(f, threads, smem)
    for splits in (1, 2, 3, 4):
        blocks = min(-(-n // rows) * splits, mod.sms * resident)
        def go(i, blocks=blocks, splits=splits):
            mod.launch(f, blocks, threads, [y, x, ws[i], partial, ctypes.c_int(m), ctypes.c_longlong(n),
                                            ctypes.c_longlong(k), ctypes.c_int(splits)], smem)
        measure(go, f"{name}, {splits} split{'s' if splits > 1 else ''}, {blocks} blocks", name, regs, y,
                ref, scale, copies, nbytes, resident)


def rows32(modules, ws, x, y, ref, scale, copies, nbytes):
    """linear_lab.cu's prototypes for 17-32 rows, k in 1-4 splits; a row per (kernel, splits):
    lab_rows32_w on a block per 128 rows of w and split, lab_rows32_s (its name gives rows, warp rows,
    chunk and stages) on at most the blocks the device holds, with its dynamic shared memory."""
    m, k = x.shape
    n = ws[0].shape[0]
    partial = torch.empty(4 * m * n, dtype=torch.float32, device="cuda")
    _, mod, regs = modules[0]
    for name in sorted(r for r in regs if r.startswith("lab_rows32_s") and not r.endswith(" spills")):
        rows, warp_rows, chunk, stages = (int(v) for v in re.search(r"_n(\d+)_w(\d+)_k(\d+)_s(\d+)", name).groups())
        persistent(mod, regs, name, rows, rows // warp_rows * 32, (rows + 32) * chunk * 2 * stages, ws, x, y,
                   partial, ref, scale, copies, nbytes)
    # (lab_rows32_w: run 78's; again with ROWS32_W=1.)
    again = os.environ.get("ROWS32_W") == "1"
    for name in sorted(r for r in regs if again and r.startswith("lab_rows32_w") and not r.endswith(" spills")):
        f = mod.function(name)
        for splits in (1, 2, 3, 4):
            blocks = -(-n // 128) * splits
            def go(i, f=f, blocks=blocks, splits=splits):
                mod.launch(f, blocks, 256, [y, x, ws[i], partial, ctypes.c_int(m), ctypes.c_longlong(n),
                                            ctypes.c_longlong(k), ctypes.c_int(splits)])
            measure(go, f"{name}, {splits} split{'s' if splits > 1 else ''}", name, regs, y, ref, scale, copies,
                    nbytes, mod.resident(f, 256))


def gmma(modules, ws, x, y, ref, scale, copies, nbytes):
    """linear_lab.cu's wgmma prototypes lab_g_x{X}_n{R}_w16_k64_s{S} for x's m rows (X the fewest of 8, 16
    and 32 that hold them), as `persistent` runs them (sm_90a only: none elsewhere)."""
    m, _ = x.shape
    n = ws[0].shape[0]
    fit = min(v for v in (8, 16, 32) if v >= m)
    partial = torch.empty(4 * m * n, dtype=torch.float32, device="cuda")
    _, mod, regs = modules[0]
    for name in sorted(r for r in regs if r.startswith(f"lab_g_x{fit}_") and not r.endswith(" spills")):
        rows, stages = (int(v) for v in re.search(r"_n(\d+)_w16_k64_s(\d+)", name).groups())
        # (wgmma's tiles want the stages on a 1024-byte boundary: 1024 bytes more to find it)
        persistent(mod, regs, name, rows, rows * 2, (rows + fit) * 128 * stages + 1024, ws, x, y, partial, ref,
                   scale, copies, nbytes)


def defines(entry):
    """`#define` lines for an entry "NAME=V,NAME=V" ("" for none)."""
    return "".join(f"#define {d.split('=')[0]} {d.split('=')[1]}\n" for d in entry.split(",") if d)


def main():
    arch = "90a"
    if "--compile-only" not in sys.argv:
        major, minor = torch.cuda.get_device_capability()
        # (sm_90a on Hopper: linear_lab.cu's wgmma prototypes need its architecture-specific features)
        arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    # (label, source): the working tree's kernels, each VARIANTS entry's defines on them, LANDED's.
    builds = [("", source())]  # (MMREG_FEW_WARPS in a variant also sets its launch's threads)
    for variant in [v for v in os.environ.get("VARIANTS", "").split("|") if v]:
        builds.append((variant, defines(variant) + source()))
    if os.environ.get("LANDED"):
        builds.append(("landed", source(os.environ["LANDED"], lab=False)))
    compiled = []
    for label, text in builds:
        cubin, log = compile_cubin(text, arch)
        regs = registers(log)
        print(f"registers{' (' + label + ')' if label else ''}:",
              {k: v for k, v in regs.items() if ("linear" in k and "bf16" in k) or k.startswith(("lab_rows32", "lab_g_"))})
        compiled.append((label, cubin, regs))
    if "--compile-only" in sys.argv:
        if os.environ.get("CUBIN"):  # for cuobjdump -sass
            open(os.environ["CUBIN"], "wb").write(compiled[0][1].raw)
        return
    modules = [(label, Module(cubin), regs) for label, cubin, regs in compiled]
    main_module = modules[0][1]
    rows = [int(r) for r in os.environ.get("ROWS", "1,8,16,32").split(",")]
    shapes = os.environ.get("SHAPES", ",".join(SHAPES)).split(",")
    read = main_module.function("lab_read")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, {main_module.sms} SMs")
    for shape in shapes:
        n, k = SHAPES[shape]
        nbytes = n * k * 2
        copies = max(2, -(-400_000_000 // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        print(f"\n## {shape}: {n} x {k}, {nbytes / 1e6:.1f} MB, {copies} copies")
        print("| kernel | rows | µs | TB/s | max error / max |y| | resident blocks an SM |\n|---|---|---|---|---|---|")
        vectors = nbytes // 16
        resident = main_module.resident(read, 256)
        us = graph_us(lambda i: main_module.launch(read, main_module.sms * resident, 256,
                                                   [ws[i], ctypes.c_longlong(vectors), sink]), copies)
        print(f"| read | – | {us:.1f} | {nbytes / us / 1e6:.2f} | – | {resident} |")
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ ws[0].float().T
            scale = ref.abs().max().item()
            us = graph_us(lambda i: F.linear(x, ws[i]), copies)
            err = (F.linear(x, ws[0]).float() - ref).abs().max().item() / scale
            print(f"| cuBLAS | {m} | {us:.1f} | {nbytes / us / 1e6:.2f} | {err:.1e} | – |")
            # (kernel, blocks, threads, takes m): as launch.rs launches them.
            kernels = []
            if m == 1:
                runs = -(-n // 2)
                kernels += [("linear_one_row_bf16", -(-runs // 4), 128, False),
                            ("linear_one_row_split2_bf16", -(-runs // 2), 128, False)]
            if m <= 8:
                kernels.append(("linear_few_rows_8_bf16", -(-n // FEW_TILE), 256, True))
            if m <= 16:
                kernels.append(("linear_few_rows_bf16", -(-n // FEW_TILE), 256, True))
            for label, mod, regs in modules:
                warps = re.search(r"MMREG_FEW_WARPS=(\d+)", label)
                for name, blocks, threads, few in kernels:
                    threads = 32 * int(warps.group(1)) if warps and few else threads
                    if name not in regs or (label and not few):
                        continue
                    f = mod.function(name)
                    def go(i, f=f, mod=mod, blocks=blocks, threads=threads, few=few):
                        args = [y, x, ws[i], ctypes.c_void_p(0)] + ([ctypes.c_int(m)] if few else []) \
                            + [ctypes.c_longlong(n), ctypes.c_longlong(k)]
                        mod.launch(f, blocks, threads, args)
                    measure(go, f"{name}{f' [{label}]' if label else ''}", name, regs, y, ref, scale, copies,
                            nbytes, mod.resident(f, threads))
            if 16 < m <= 32:
                rows32(modules, ws, x, y, ref, scale, copies, nbytes)
            if m <= 32:
                gmma(modules, ws, x, y, ref, scale, copies, nbytes)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
