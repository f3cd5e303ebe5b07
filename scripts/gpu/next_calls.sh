#!/usr/bin/env bash
# Issue #18's pending measurements in three device calls (each under 600 s; about 1700 s of device time
# with their starts, the budget of one session). On the GPU machine, from the repo root (carry:
# ["gpu-stage"]):
#   scripts/gpu/next_calls.sh tests    the GPU tests (MMREG_TEST_MODES=cuda), then LLaVA-1.5-7B at batch 1
#                                      and 8 with each decode and prefill switch that is off by default
#   scripts/gpu/next_calls.sh next     LLaVA-NeXT-Mistral-7B at batch 1 and 8 (chunked prefill off, varlen
#                                      prefill, fast activations); LLaVA-1.5-7B at batch 32 with the
#                                      32-row few-rows kernels; the staged gpu-stage/mmreg-before.gz (an
#                                      earlier build) against this one at batch 1 and 8
#   scripts/gpu/next_calls.sh anchor   mmreg as it runs (plus WINNERS, "ENV=V,ENV=V", exported) and the
#                                      compiled-PyTorch anchor at batch 1, 8 and 32
# Raw files (JSON and logs) land in $OUT; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
start=$SECONDS
echo "staged: $(cat gpu-stage/commit)"

# quick_bench.py for one model and its batches under a time limit, its log and JSON kept as $1.*.
bench() {
  local name=$1 limit=$2
  shift 2
  env "$@" timeout "$limit" python3 scripts/gpu/quick_bench.py gpu-stage/run.sh > "$OUT/$name.log" 2>&1
  echo "$name: exit $? at $((SECONDS - start)) s"
  [ -f "$OUT/quick-bench.json" ] && mv "$OUT/quick-bench.json" "$OUT/$name.json"
}

# Each peer's prefill and decode figures from a quick_bench JSON.
table() {
  python3 - "$OUT/$1.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no results: {e}")
for model, rec in d["models"].items():
    print(f"## {d.get('gpu')}, {model}")
    for p in rec.get("peers", []):
        r = p["result"]
        keys = sorted(k for k in r if k.startswith(("prefill_bs", "decode_tok_per_s_bs")) and "embed" not in k)
        print(f"{p['label'][-70:]:70s}", " ".join(f"{k.replace('_tok_per_s', '')}={r[k]:.1f}" for k in keys))
PY
}

case "${1:-}" in
  tests)
    { MMREG_TEST_MODES=cuda timeout 120 gpu-stage/run.sh cuda_graphs --nocapture
      MMREG_TEST_MODES=cuda timeout 150 gpu-stage/run.sh fused_kernels; } > "$OUT/gpu-tests.log" 2>&1
    echo "GPU tests: exit $? at $((SECONDS - start)) s"
    grep -E "^test result|FAILED|panicked|^varlen prefill|^CUDA graphs" "$OUT/gpu-tests.log" | head
    bench llava15-switches $((570 - (SECONDS - start))) MODELS=LLaVA-1.5-7B BATCHES=1,8 REPEAT=1 \
      VARIANTS="MMREG_ATTENTION_SIX_WARPS=1|MMREG_EARLY_READS=1|MMREG_FEW_PREFETCH_NEXT=1|MMREG_VARLEN_PREFILL=1|MMREG_FAST_ACTIVATIONS=1"
    table llava15-switches
    ;;
  next)
    bench next-switches 280 MODELS=LLaVA-NeXT-Mistral-7B BATCHES=1,8 REPEAT=1 \
      VARIANTS="ARGS=--no-enable-chunked-prefill|MMREG_VARLEN_PREFILL=1|MMREG_FAST_ACTIVATIONS=1"
    table next-switches
    bench llava15-b32 $((450 - (SECONDS - start))) MODELS=LLaVA-1.5-7B BATCHES=32 REPEAT=1 \
      VARIANTS="MMREG_FEW_ROWS_32=1|MMREG_FEW_ROWS_32=epilogues|MMREG_FEW_ROWS_32=1,MMREG_FEW_UNROLL_32=4"
    table llava15-b32
    if [ -f gpu-stage/mmreg-before.gz ]; then
      gunzip -kf gpu-stage/mmreg-before.gz && chmod +x gpu-stage/mmreg-before
      bench llava15-before $((570 - (SECONDS - start))) MODELS=LLaVA-1.5-7B BATCHES=1,8 REPEAT=1 BEFORE=1
      table llava15-before
    fi
    ;;
  anchor)
    # WINNERS: the switches that won the calls above, until they are the defaults.
    winners=()
    [ -n "${WINNERS:-}" ] && IFS=, read -ra winners <<< "$WINNERS"
    bench anchor 570 "${winners[@]}" MODELS=LLaVA-1.5-7B BATCHES=1,8,32 ANCHOR=1 ANCHOR_TIMEOUT=400
    table anchor
    ;;
  *)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
echo "done at $((SECONDS - start)) s"
