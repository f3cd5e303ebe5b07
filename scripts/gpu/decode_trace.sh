#!/usr/bin/env bash
# Where a decode step's time goes, kernel by kernel, for mmreg as it runs by default and for environment
# variants of it: LLaVA-1.5-7B shapes, `mmreg bench --trace` (a lone prefill, 16 decode steps at batch 1,
# 8 and 32), with MMREG_PDL=0 so that each kernel's time in the trace is its own (with programmatic
# dependent launch a kernel's time includes its wait for the one before). For each variant, the decode
# graph's kernels by position (trace_summary.py).
# Usage on the GPU machine, from the repo root, with the staged binary (carry: ["gpu-stage"]):
#   VARIANTS="MMREG_LINEAR_STAGES=4|MMREG_LINEAR_STAGES=8" scripts/gpu/decode_trace.sh
# FIRST=N / LAST=N: how many positions of the step to list from its start / end (20 / 6). DEFAULT=0 skips
# the default pass (run 115: two variants in the other order, 40 s).
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
      --prompt "USER: <image>\nWhat is shown in this image? ASSISTANT:" --batch 1 --max-tokens 32
      --device cuda --dtype bf16)
# DEFAULT=0: the variants alone (to compare two of them in a short call).
if [ "${DEFAULT:-1}" = 0 ]; then
  IFS='|' read -r -a variants <<< "${VARIANTS:-}"
else
  IFS='|' read -r -a variants <<< "default|${VARIANTS:-}"
fi
for i in "${!variants[@]}"; do
  variant=${variants[$i]}
  [ -n "$variant" ] || continue
  env_args=(MMREG_PDL=0)
  if [ "$variant" != default ]; then
    IFS=',' read -r -a more <<< "$variant"
    env_args+=("${more[@]}")
  fi
  dir=/tmp/trace-$i
  rm -rf "$dir"
  env "${env_args[@]}" gpu-stage/run.sh mmreg "${args[@]}" --trace "$dir" > "$out/trace-$i.json" 2> "$out/trace-$i.err"
  echo "== $variant (MMREG_PDL=0): $(tail -n1 "$out/trace-$i.json")"
  for t in "$dir"/decode_bs1.json "$dir"/decode_bs8.json "$dir"/decode_bs32.json; do
    [ -f "$t" ] && { python3 scripts/gpu/trace_summary.py "$t" 2>&1 | head -60 || true; }  # (head closing the pipe early is no failure)
  done
done
