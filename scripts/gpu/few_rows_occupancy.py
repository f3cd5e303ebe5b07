"""Blocks an SM of the few-rows kernels, as the driver reports them (issue #18): each kernel of
csrc/fused_kernels.cu compiled as the engine compiles it, with each entry of DEFINES ("NAME=V,NAME=V|...",
"" for the defaults) set. Usage on the GPU machine: DEFINES="|MMREG_FEW_UNROLL_8=2" python3 scripts/gpu/few_rows_occupancy.py
(run 120 measured its MMREG_ROPE_MIN_BLOCKS=3, launch bounds of three blocks an SM for the rope kernel:
docs/benchmarks.md)
"""
import os, sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_lab as lab  # noqa: E402

major, minor = torch.cuda.get_device_capability()
for entry in os.environ.get("DEFINES", "").split("|"):
    cubin, log = lab.compile_cubin(lab.defines(entry) + lab.source(lab=False), f"{major}{minor}")
    regs = lab.registers(log)
    mod = lab.Module(cubin)
    for name in ("linear_few_rows_8_bf16", "linear_few_rows_silu_8_bf16", "linear_few_rows_rope_8_bf16"):
        print(f"{entry or 'defaults'}: {name}: {regs.get(name)} registers, "
              f"{mod.resident(mod.function(name), 256)} blocks of 256 threads an SM")
