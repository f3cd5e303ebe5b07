#!/usr/bin/env bash
# Issue #18, the kernels of our own at decode, in one device call: the staged GPU tests (the kernels
# against libtorch, in the engine, in CUDA graphs), then LLaVA-1.5-7B shapes at batch 1, 8 and 32 with
# libtorch's ops, with the fused kernels, and with the fused kernels but cuBLAS for every product
# (MMREG_FUSED_LINEAR=0), traces of the fused run, then the compiled-PyTorch anchor on the same decoder
# and prompt. Raw JSON to $OUT/decode-kernels.json.
# Usage on the GPU machine, from the repo root, after scripts/gpu-stage.sh (carry: ["gpu-stage"]):
#   scripts/gpu/decode_kernels.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout ${TEST_TIMEOUT:-180} gpu-stage/run.sh > "$out/gpu-tests.log" 2>&1
echo "GPU tests: exit $?"
grep -E "^== |^test .*(ok|FAILED)$|^test result|panicked|SKIPPED|unavailable" "$out/gpu-tests.log" | grep -v " ok$"
python3 - <<'PY'
import os, subprocess, sys
sys.path.insert(0, "scripts/gpu")
from bench_common import SHAPES, anchor, floor, mmreg_bench, print_table, record, write_json
shape = SHAPES[0]
result = record("decode-kernels")
model = shape.make(shape.path)
rec = result["models"][shape.name] = {"prompt": shape.prompt, "image": shape.image, "floor": floor(model)}
del model
import torch; torch.cuda.empty_cache()
rec["peers"] = []
for fused, env, trace in [(False, None, None), (True, None, "/tmp/trace-fused"),
                          (True, {"MMREG_FUSED_LINEAR": "0"}, None)]:
    rec["peers"].append(mmreg_bench(shape.path, shape.prompt, shape.image, shape.batches, fused=fused,
                                    env_extra=env, trace=trace))
    write_json("decode-kernels.json", result)
print_table(f"{result['gpu']}, commit {result['commit']}: {shape.name}", rec["peers"])
for name in ["decode_bs1", "decode_bs8", "prefill_bs1"]:
    subprocess.run([sys.executable, "scripts/gpu/trace_summary.py", f"/tmp/trace-fused/{name}.json"])
peer = anchor(rec["peers"][0]["result"]["prompt_tokens"], shape.batches)
if peer:
    rec["peers"].append(peer)
    write_json("decode-kernels.json", result)
print_table(f"{result['gpu']}, commit {result['commit']}: {shape.name}", rec["peers"])
PY
