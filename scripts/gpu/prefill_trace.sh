#!/usr/bin/env bash
# Where a prefill's time goes, for LLaVA-NeXT-Mistral-7B (2358-token prompts, 5 tiles an image) and
# LLaVA-1.5-7B (604): `mmreg bench --trace` at batch 1, then trace_summary.py on the lone prefill
# (`prefill_bs1.json`) and on 8 prompts at once (`prefill_bs8.json`; NeXT's take 3 steps of 8192 tokens,
# two of them continuing a prompt that the step before began). Each summary ends with the GPU's
# longest idle gaps, and the kernels on either side: where the host made the GPU wait. MMREG_PDL=0, so
# each kernel's time is its own. About 4 minutes of device time with both checkpoints to build.
# Usage on the GPU machine, from the repo root, with the staged binary (carry: ["gpu-stage"]):
#   MODELS="LLaVA-NeXT-Mistral-7B LLaVA-1.5-7B" scripts/gpu/prefill_trace.sh
# (BENCH_ARGS="--no-enable-chunked-prefill": whole prompts a step; ONLY=prefill_bs8: that trace alone)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
mkdir -p "$out"
for model in ${MODELS:-LLaVA-NeXT-Mistral-7B LLaVA-1.5-7B}; do
  read -r dir image prompt < <(MODEL="$model" python3 - <<'PY' | tail -n1
import os, sys; sys.path.insert(0, "scripts/gpu")
from bench_common import SHAPES
shape = next(s for s in SHAPES if s.name == os.environ["MODEL"])
shape.make(shape.path)
print(shape.path, shape.image, shape.prompt.replace("\n", "\\n"))
PY
  )
  prompt=$(printf '%b' "$prompt")
  trace=/tmp/trace-$model
  rm -rf "$trace"
  # BENCH_ARGS: more flags of `mmreg bench` (say --no-enable-chunked-prefill).
  # shellcheck disable=SC2086
  MMREG_PDL=0 gpu-stage/run.sh mmreg bench --model "$dir" --image "$image" --prompt "$prompt" --batch 1 \
    --max-tokens 16 --device cuda --dtype bf16 --trace "$trace" ${BENCH_ARGS:-} > "$out/prefill-trace-$model.json" \
    2> "$out/prefill-trace-$model.err"
  echo "== $model (MMREG_PDL=0): $(tail -n1 "$out/prefill-trace-$model.json")"
  for name in ${ONLY:-prefill_bs1 prefill_bs8}; do
    t=$trace/$name.json
    [ -f "$t" ] && GAPS=12 python3 scripts/gpu/trace_summary.py "$t" 2>&1
  done
done
