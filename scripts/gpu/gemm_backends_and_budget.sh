#!/usr/bin/env bash
# Run 66: libtorch's GEMM choices (cuBLASLt preferred; TunableOp) on LLaVA-1.5-7B at batch 1/8/32, and LLaVA-NeXT's batch-8
# prefill with step budgets of 8192 and 20480 tokens. On the GPU machine, from the repo root (carry: ["gpu-stage"]):
#   scripts/gpu/gemm_backends_and_budget.sh   (raw files in $OUT)
set -uo pipefail
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
cat gpu-stage/commit
start=$SECONDS
MODELS=LLaVA-1.5-7B BATCHES=1,8,32 REPEAT=1 VARIANTS="TORCH_BLAS_PREFER_CUBLASLT=1|PYTORCH_TUNABLEOP_ENABLED=1,PYTORCH_TUNABLEOP_TUNING=1,PYTORCH_TUNABLEOP_FILENAME=/tmp/tunableop.csv" \
  timeout 300 python3 scripts/gpu/quick_bench.py gpu-stage/run.sh > "$OUT/quick-bench.log" 2>&1
echo "qb rc $? at $((SECONDS-start)) s"
cp /tmp/tunableop*.csv "$OUT/" 2>/dev/null
python3 - <<'PY' > "$OUT/next-make.log" 2>&1
import sys; sys.path.insert(0, "scripts/gpu")
from bench_common import SHAPES
s = SHAPES[1]; s.make(s.path)
PY
echo "next made at $((SECONDS-start)) s"
for n in 8192 20480 8192 20480; do
  [ $((SECONDS-start)) -gt 500 ] && break
  echo "== budget $n" >> "$OUT/next-budget.log"
  timeout 60 gpu-stage/run.sh mmreg bench --model /tmp/llava-next-mistral-7b --image fixtures/llava-next-tiny-real/images/landscape_480x640.png --prompt "[INST] <image>
What is shown in this image? [/INST]" --batch 8 --max-tokens 8 --device cuda --dtype bf16 --max-num-batched-tokens $n 2>&1 | tail -3 >> "$OUT/next-budget.log"
done
echo "done at $((SECONDS-start)) s"
python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ["OUT"], "quick-bench.json")))
for p in d["models"]["LLaVA-1.5-7B"]["peers"]:
    r = p["result"]
    print(p["label"][-60:], {k: round(r[k], 1) for k in r if k.startswith(("decode_tok", "prefill_bs")) and isinstance(r[k], (int, float))})
PY
grep -o "'prefill_bs8_ms': [0-9.]*\|'prefill_steps_bs8': [0-9.]*\|== budget [0-9]*" "$OUT/next-budget.log"
