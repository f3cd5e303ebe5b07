#!/usr/bin/env bash
# Why the fused kernels lose at batch 1 (issue #18): LLaVA-1.5-7B shapes, batch 1, with and without
# MMREG_FUSED_KERNELS, each with a Kineto trace of its decode steps, summarised side by side.
# Usage on the GPU machine, from the repo root, with the staged binary (carry the staging):
#   scripts/gpu/fused_b1_trace.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
python3 - <<'PY'
import sys; sys.path.insert(0, "scripts/gpu")
import checkpoints
from bench_common import LLAVA
checkpoints.llava15(LLAVA)
PY
args=(bench --model /tmp/llava-1.5-7b --image fixtures/llava-tiny-real/images/b_480x640.png
      --prompt "USER: <image>\nWhat is shown in this image? ASSISTANT:" --batch 1 --max-tokens 128
      --device cuda --dtype bf16)
for mode in off on; do
  if [ $mode = on ]; then export MMREG_FUSED_KERNELS=1; else unset MMREG_FUSED_KERNELS; fi
  gpu-stage/run.sh mmreg "${args[@]}" --trace /tmp/trace-$mode > "$out/bench-fused-$mode.json" 2> "$out/bench-fused-$mode.err"
  echo "fused $mode: $(tail -n1 "$out/bench-fused-$mode.json")"
  for t in /tmp/trace-$mode/*.json; do
    python3 scripts/gpu/trace_summary.py "$t" 2>&1 | head -40
  done
done
