#!/usr/bin/env bash
# Issue #18's next measurements in three device calls (each under 600 s; about 1700 s of device time
# with their starts, the budget of one session). On the GPU machine, from the repo root (carry:
# ["gpu-stage"]):
#   scripts/gpu/next_calls.sh tests    the GPU tests (MMREG_TEST_MODES=cuda), then LLaVA-1.5-7B at batch 1
#                                      and 8 as it runs, and with the early reads or the six-warp
#                                      attention off; then the staged
#                                      gpu-stage/mmreg-before.gz (an earlier build) against this one
#   scripts/gpu/next_calls.sh next     LLaVA-NeXT-Mistral-7B at batch 1 and 8, and with chunked prefill
#                                      off (or each of NEXT_VARIANTS, "ENV=V|ENV=V"), twice, alternating
#   scripts/gpu/next_calls.sh rest     LLaVA-NeXT as it runs (SKIP_NEXT=1: not); LLaVA-1.5 at batch 1, 8
#                                      and 32 with each of REST_VARIANTS; then, if time is left,
#                                      gpu-stage/mmreg-before.gz against this build at batch 1 and 8 (for a
#                                      session with two calls' time: anchor, then rest)
#   scripts/gpu/next_calls.sh before   gpu-stage/mmreg-before.gz (an earlier build) against this one:
#                                      LLaVA-1.5 at BEFORE_BATCHES (1,8,32) twice, LLaVA-NeXT at
#                                      NEXT_BATCHES (1,8) NEXT_REPEAT times (1), each of BEFORE_VARIANTS at
#                                      LLaVA-1.5's 1 and 8; GPU tests
#   scripts/gpu/next_calls.sh short    GPU tests; gpu-stage/mmreg-before.gz against this build once:
#                                      LLaVA-NeXT at batch 8, LLaVA-1.5 at 1 and 8 (a short call)
#   scripts/gpu/next_calls.sh cudnn    GPU tests (cuDNN's attention's first); cuDNN's attention called
#                                      directly (MMREG_CUDNN_ATTENTION=1) against libtorch's: LLaVA-1.5 at
#                                      batch 1 and 8 twice, LLaVA-NeXT at batch 8 once
#   scripts/gpu/next_calls.sh tuned    products tuned on the card (the default): its GPU test; LLaVA-1.5
#                                      at TUNED_BATCHES (1,8,32) as it runs against libtorch's products
#                                      (MMREG_TUNED_GEMM=0; or each of TUNED_VARIANTS), twice; the
#                                      engine's CUDA-graph test, then lt_sweep.py's prefill and vision
#                                      shapes in what is left
#   scripts/gpu/next_calls.sh chunks   LLaVA-NeXT's batch 8 chunked against whole prompts, alternating,
#                                      with nvidia-smi's clocks sampled beside it
#   scripts/gpu/next_calls.sh lab      the products at LAB_ROWS rows (8,32) alone: cuBLAS against our
#                                      8-row kernels, linear_lab.cu's lab_rows32_s and wgmma lab_g_x*
#                                      prototypes, k in 1-4 splits (ROWS32_W=1:
#                                      lab_rows32_w's too; about a minute)
#   scripts/gpu/next_calls.sh anchor   the tuned products' GPU test (where staged); mmreg as it runs
#                                      (plus WINNERS, "ENV=V,ENV=V", exported; and each of
#                                      ANCHOR_VARIANTS, "ENV=V|ENV=V", ANCHOR_REPEAT times, once by
#                                      default) and the compiled-PyTorch anchor at batch 1, 8 and 32
#                                      and again with its decode position on the device, gpt-fast's loop
#                                      (ANCHOR_DEVICE_POS=0: not); with SAME_TOKENS ("ENV=V,ENV=V"),
#                                      the tokens of 33 requests with those switches against the
#                                      default's, run twice (see same_tokens); the other GPU tests in
#                                      what is left
# ONLY_H200=1 (any mode): nothing runs unless the card is an H200.
# Raw files (JSON and logs) land in $OUT; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}
# LIMIT: the seconds this call may take (575 by default; less when the session's device time is short).
LIMIT=${LIMIT:-575}
export ANCHOR_DEADLINE=$(($(date +%s) + LIMIT - 5))
mkdir -p "$OUT"
start=$SECONDS
echo "staged: $(cat gpu-stage/commit)"
# ONLY_H200=1: run nothing unless the card is an H200 (the targets' card), so that a start that gets
# another card costs only its start.
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "card: ${card:-unknown}"
if [ "${ONLY_H200:-0}" = 1 ] && [[ "$card" != *H200* ]]; then
  echo "ONLY_H200: not an H200, nothing run"
  exit 0
fi

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
        keys = sorted(k for k in r if k.startswith(("prefill_bs", "decode_tok_per_s_bs", "decode_with_tail_tok_per_s_bs32")) and "embed" not in k
                      and isinstance(r[k], (int, float)))
        print(f"{p['label'][-70:]:70s}", " ".join(f"{k.replace('_tok_per_s', '')}={r[k]:.1f}" for k in keys))
PY
  # Each decode figure's share of its bandwidth floor (weights and KV), from the same file.
  [ -f "$OUT/$1.json" ] && python3 scripts/floor_shares.py --width 70 "$OUT/$1.json" | grep -v '^|---'
}

# Whether the switches in $1 ("ENV=V,ENV=V") generate the default's tokens on LLaVA-1.5-7B (greedy, bf16,
# CUDA graphs): 32 requests of the benchmark's prompt and image, 24 tokens each, so that the decode steps
# take the 32-row path, then one more of 40 tokens that decodes alone at the end. Not a test of equality:
# the request whose prompt the prefill budget splits in two steps rounds differently, and which one that
# is depends on the order the workers finish preprocessing (runs 124 and 127: 31 of 33 the same between
# two processes as they run). So the default runs twice (the control), and the tuned products, which
# round each prefill step's rows by their own pick, are off on every side (MMREG_TUNED_GEMM=0) unless $1
# sets them. A switch is suspect where it changes more requests than the control. Outputs and log in
# $OUT/same-tokens.*.
same_tokens() {
  local reqs="$OUT/same-tokens.requests.jsonl" model env side extra
  # The requests, and the checkpoint the benchmark made (its path, printed).
  model=$(python3 - "$reqs" <<'PY'
import json, sys
sys.path.insert(0, "scripts/gpu")
from bench_common import IMAGE15, LLAVA, PROMPT15
with open(sys.argv[1], "w") as f:
    for i in range(33):
        f.write(json.dumps({"prompt": PROMPT15, "images": [IMAGE15], "max_tokens": 24 if i < 32 else 40}) + "\n")
print(LLAVA)
PY
)
  IFS=, read -ra env <<< "MMREG_TUNED_GEMM=0,$1"
  for side in default again switched; do
    extra=("${env[0]}")
    [ "$side" = switched ] && extra=("${env[@]}")
    env "${extra[@]}" timeout 240 gpu-stage/run.sh mmreg generate --model "$model" --requests "$reqs" \
      --device cuda --dtype bf16 > "$OUT/same-tokens.$side.jsonl" 2>> "$OUT/same-tokens.log"
    echo "same tokens, $side: exit $? at $((SECONDS - start)) s"
  done
  python3 - "$OUT/same-tokens" "$1" <<'PY'
import json, sys
runs = {s: [json.loads(line).get("token_ids") for line in open(f"{sys.argv[1]}.{s}.jsonl")]
        for s in ("default", "again", "switched")}
for side in ("again", "switched"):
    same = sum(x == y and x is not None for x, y in zip(runs["default"], runs[side]))
    print(f"same tokens, default and {side} ({sys.argv[2] if side == 'switched' else 'the control'}): "
          f"{same} of {len(runs['default'])} requests ({len(runs[side])} answered)")
PY
}

case "${1:-}" in
  tests)
    { MMREG_TEST_MODES=cuda timeout 120 gpu-stage/run.sh cuda_graphs --nocapture
      MMREG_TEST_MODES=cuda timeout 100 gpu-stage/run.sh fused_kernels --skip nvrtc; } \
      > "$OUT/gpu-tests.log" 2>&1
    echo "GPU tests: exit $? at $((SECONDS - start)) s"
    grep -E "^test result|FAILED|panicked|^CUDA graphs" "$OUT/gpu-tests.log" | head
    bench llava15-switches 330 MODELS=LLaVA-1.5-7B BATCHES=1,8 REPEAT=2 \
      VARIANTS="MMREG_EARLY_READS=0|MMREG_ATTENTION_SIX_WARPS=0"
    table llava15-switches
    if [ -f gpu-stage/mmreg-before.gz ]; then
      gunzip -kf gpu-stage/mmreg-before.gz && chmod +x gpu-stage/mmreg-before
      bench llava15-before $((LIMIT - 5 - (SECONDS - start))) MODELS=LLaVA-1.5-7B BATCHES=1,8 REPEAT=1 BEFORE=1
      table llava15-before
    fi
    ;;
  next)
    bench next-switches "$LIMIT" MODELS=LLaVA-NeXT-Mistral-7B BATCHES=1,8 REPEAT=2 \
      VARIANTS="${NEXT_VARIANTS:-ARGS=--no-enable-chunked-prefill}"
    table next-switches
    ;;
  rest)
    # What the anchor call leaves: LLaVA-NeXT as it runs (its targets), then the staged
    # gpu-stage/mmreg-before.gz against this build on LLaVA-1.5 at batch 1 and 8.
    if [ -z "${SKIP_NEXT:-}" ]; then  # SKIP_NEXT=1: LLaVA-1.5 alone
      bench next 200 MODELS=LLaVA-NeXT-Mistral-7B BATCHES=1,8
      table next
    fi
    # REST_VARIANTS: switches to time against the default at batch 1, 8 and 32 ("ENV=V|ENV=V").
    if [ -n "${REST_VARIANTS:-}" ]; then
      bench llava15-variants $((LIMIT - 75 - (SECONDS - start))) MODELS=LLaVA-1.5-7B BATCHES=1,8,32 REPEAT=1 \
        VARIANTS="$REST_VARIANTS"
      table llava15-variants
    fi
    if [ -f gpu-stage/mmreg-before.gz ] && [ $((SECONDS - start)) -lt $((LIMIT - 155)) ]; then
      gunzip -kf gpu-stage/mmreg-before.gz && chmod +x gpu-stage/mmreg-before
      bench llava15-before $((LIMIT - (SECONDS - start))) MODELS=LLaVA-1.5-7B BATCHES=1,8 REPEAT=1 BEFORE=1
      table llava15-before
    fi
    ;;
  before)
    # The GPU tests; then this build against the staged gpu-stage/mmreg-before.gz (an earlier build):
    # LLaVA-1.5 at BEFORE_BATCHES (1, 8 and 32 by default), alternating BEFORE_REPEAT times (2);
    # LLaVA-NeXT at NEXT_BATCHES (1 and 8), NEXT_REPEAT times (1; SKIP_NEXT=1: not); with BEFORE_VARIANTS ("ENV=V|ENV=V"),
    # each against this build's default at LLaVA-1.5's batch 1 and 8; with TRACE=1, prefill_trace.sh on
    # LLaVA-1.5 if time is left.
    { MMREG_TEST_MODES=cuda timeout 100 gpu-stage/run.sh cuda_graphs
      MMREG_TEST_MODES=cuda timeout 100 gpu-stage/run.sh fused_kernels --skip nvrtc
      if [ -x gpu-stage/tests/fused_engine ]; then
        MMREG_TEST_MODES=cuda timeout 100 gpu-stage/run.sh fused_engine
      fi
    } > "$OUT/gpu-tests.log" 2>&1
    echo "GPU tests: exit $? at $((SECONDS - start)) s"
    grep -E "^test result|FAILED|panicked" "$OUT/gpu-tests.log" | head
    gunzip -kf gpu-stage/mmreg-before.gz && chmod +x gpu-stage/mmreg-before
    bench llava15-before $((LIMIT - 5 - (SECONDS - start))) MODELS=LLaVA-1.5-7B \
      BATCHES="${BEFORE_BATCHES:-1,8,32}" REPEAT="${BEFORE_REPEAT:-2}" BEFORE=1
    table llava15-before
    if [ -z "${SKIP_NEXT:-}" ]; then
      bench next-before $((LIMIT - 5 - (SECONDS - start))) MODELS=LLaVA-NeXT-Mistral-7B \
        BATCHES="${NEXT_BATCHES:-1,8}" REPEAT="${NEXT_REPEAT:-1}" BEFORE=1
      table next-before
    fi
    if [ -n "${BEFORE_VARIANTS:-}" ]; then
      bench llava15-variants $((LIMIT - 5 - (SECONDS - start))) MODELS=LLaVA-1.5-7B BATCHES=1,8 REPEAT=1 \
        VARIANTS="$BEFORE_VARIANTS"
      table llava15-variants
    fi
    if [ -n "${TRACE:-}" ] && [ $((LIMIT - (SECONDS - start))) -gt 60 ]; then
      MODELS=LLaVA-1.5-7B timeout $((LIMIT - (SECONDS - start))) scripts/gpu/prefill_trace.sh \
        > "$OUT/prefill-trace.log" 2>&1
      echo "prefill trace: exit $? at $((SECONDS - start)) s"
    fi
    ;;
  short)
    # For a call with little device time left: the GPU tests, then gpu-stage/mmreg-before.gz against
    # this build once each, LLaVA-NeXT at batch 8 (its first pass and median too), then LLaVA-1.5 at
    # batch 1 and 8 in what is left of LIMIT.
    { MMREG_TEST_MODES=cuda timeout 60 gpu-stage/run.sh cuda_graphs
      MMREG_TEST_MODES=cuda timeout 60 gpu-stage/run.sh fused_kernels --skip nvrtc
    } > "$OUT/gpu-tests.log" 2>&1
    echo "GPU tests: exit $? at $((SECONDS - start)) s"
    grep -E "^test result|FAILED|panicked" "$OUT/gpu-tests.log" | head
    gunzip -kf gpu-stage/mmreg-before.gz && chmod +x gpu-stage/mmreg-before
    bench next-short $(((LIMIT - (SECONDS - start)) * 3 / 5)) MODELS=LLaVA-NeXT-Mistral-7B BATCHES=8 REPEAT=1 \
      BEFORE=1
    bench llava15-short $((LIMIT - 5 - (SECONDS - start))) MODELS=LLaVA-1.5-7B BATCHES=1,8 REPEAT=1 BEFORE=1
    for name in next-short llava15-short; do
      table "$name"
      python3 - "$OUT/$name.json" <<'PY'
import json, sys
for model, rec in json.load(open(sys.argv[1]))["models"].items():
    for p in rec.get("peers", []):
        r = p["result"]
        for b in (1, 8):
            if f"prefill_bs{b}_passes_ms" in r:
                print(p["label"][:12], f"b{b} passes", [round(x, 1) for x in r[f"prefill_bs{b}_passes_ms"]],
                      "issue", round(r.get(f"prefill_issue_bs{b}_ms", 0), 1))
PY
    done
    ;;
  cudnn)
    # cuDNN's attention called directly (MMREG_CUDNN_ATTENTION=1) against libtorch's (the default): its
    # GPU test first, then the other GPU tests with the direct call on, then LLaVA-1.5 at batch 1 and 8
    # alternating twice, then LLaVA-NeXT at batch 8 once each in what is left.
    { MMREG_TEST_MODES=cuda timeout 60 gpu-stage/run.sh cudnn_attention --nocapture
      MMREG_CUDNN_ATTENTION=1 MMREG_TEST_MODES=cuda timeout 90 gpu-stage/run.sh cuda_graphs
      MMREG_CUDNN_ATTENTION=1 MMREG_TEST_MODES=cuda timeout 60 gpu-stage/run.sh fused_kernels --skip nvrtc
    } > "$OUT/gpu-tests.log" 2>&1
    echo "GPU tests: exit $? at $((SECONDS - start)) s"
    grep -E "^test result|FAILED|panicked|bit-identical|SKIPPED|first calls" "$OUT/gpu-tests.log" | head -20
    bench llava15-cudnn $(((LIMIT - (SECONDS - start)) * 13 / 20)) MODELS=LLaVA-1.5-7B BATCHES=1,8 REPEAT=2 \
      VARIANTS="MMREG_CUDNN_ATTENTION=1"
    bench next-cudnn $((LIMIT - 5 - (SECONDS - start))) MODELS=LLaVA-NeXT-Mistral-7B BATCHES=8 REPEAT=1 \
      VARIANTS="MMREG_CUDNN_ATTENTION=1"
    for name in llava15-cudnn next-cudnn; do
      table "$name"
      python3 - "$OUT/$name.json" <<'PY'
import json, sys
for model, rec in json.load(open(sys.argv[1]))["models"].items():
    for p in rec.get("peers", []):
        r = p["result"]
        for b in (1, 8):
            if f"prefill_bs{b}_passes_ms" in r:
                print(p["label"][-40:], f"b{b} passes", [round(x, 2) for x in r[f"prefill_bs{b}_passes_ms"]])
PY
    done
    ;;
  tuned)
    MMREG_TEST_MODES=cuda timeout 100 gpu-stage/run.sh tuned_gemm --nocapture > "$OUT/gpu-tests.log" 2>&1
    echo "GPU tests: exit $? at $((SECONDS - start)) s"
    grep -E "^test result|FAILED|panicked|SKIPPED|by .* x .*: " "$OUT/gpu-tests.log" | head -20
    MMREG_TUNED_GEMM_LOG=1 bench llava15-tuned $(((LIMIT - (SECONDS - start)) * 4 / 5)) MODELS=LLaVA-1.5-7B \
      BATCHES=${TUNED_BATCHES:-1,8,32} REPEAT=${TUNED_REPEAT:-2} \
      VARIANTS="${TUNED_VARIANTS:-MMREG_TUNED_GEMM=0}"
    table llava15-tuned
    python3 - "$OUT/llava15-tuned.json" <<'PY'
import json, sys
for model, rec in json.load(open(sys.argv[1]))["models"].items():
    for p in rec.get("peers", []):
        r = p["result"]
        for b in (1, 8, 32):
            if f"prefill_bs{b}_passes_ms" in r:
                print(p["label"][-45:], f"b{b} prefill passes", [round(x, 2) for x in r[f"prefill_bs{b}_passes_ms"]],
                      "decode", r.get(f"decode_tok_per_s_bs{b}"))
PY
    grep -h "mmreg: tuned" "$OUT/llava15-tuned.log" | sort | uniq | head -60
    left=$((LIMIT - 5 - (SECONDS - start)))
    [ "$left" -gt 60 ] && MMREG_TEST_MODES=cuda timeout 60 gpu-stage/run.sh cuda_graphs \
      >> "$OUT/gpu-tests.log" 2>&1; echo "cuda_graphs: exit $?"
    left=$((LIMIT - 5 - (SECONDS - start)))
    [ "$left" -gt 30 ] && SETS=prefill,vision JSON="$OUT/lt-sweep.json" timeout "$left" \
      python3 scripts/gpu/lt_sweep.py > "$OUT/lt-sweep.log" 2>&1
    grep -E "^## |^\| (F.linear|heuristic|#1 )" "$OUT/lt-sweep.log" | head -60
    ;;
  chunks)
    # LLaVA-NeXT's batch 8 with chunked prefill (the default) against whole prompts a step
    # (--no-enable-chunked-prefill), alternating CHUNKS_REPEAT times (3), with the GPU's clock, power
    # and throttle reasons sampled every 200 ms beside it (smi.csv): how much of the spread between
    # passes is the card's clock.
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
      --format=csv -lms 200 > "$OUT/smi.csv" 2>&1 &
    smi=$!
    bench next-chunks $((LIMIT - 5 - (SECONDS - start))) MODELS=LLaVA-NeXT-Mistral-7B BATCHES=8 \
      REPEAT="${CHUNKS_REPEAT:-3}" VARIANTS="ARGS=--no-enable-chunked-prefill"
    kill "$smi" 2>/dev/null
    table next-chunks
    python3 - "$OUT/next-chunks.json" <<'PY'
import json, sys
for model, rec in json.load(open(sys.argv[1]))["models"].items():
    for p in rec.get("peers", []):
        r = p["result"]
        print(p["label"][-40:], "passes", [round(x, 1) for x in r.get("prefill_bs8_passes_ms", [])],
              "issue", round(r.get("prefill_issue_bs8_ms", 0), 1),
              "steps", [[round(v, 1) for v in s] for s in r.get("prefill_step_detail_bs8", [])])
PY
    ;;
  lab)
    # The batch-32 products alone: cuBLAS, a plain read of each weight and linear_lab.cu's lab_rows32_s
    # and lab_g_x* (wgmma) prototypes (17-32 rows; lab_rows32_w's too with ROWS32_W=1; at 8 rows our
    # kernels and the wgmma ones), on LLaVA-1.5-7B's weight shapes.
    ROWS=${LAB_ROWS:-8,32} timeout $((LIMIT - 5)) python3 scripts/gpu/linear_lab.py > "$OUT/linear-lab.log" 2>&1
    echo "linear_lab: exit $? at $((SECONDS - start)) s"
    grep -E "^## |^\| (read|cuBLAS|lab_|linear_few)" "$OUT/linear-lab.log"
    ;;
  anchor)
    # WINNERS: the switches that won the calls above, until they are the defaults.
    winners=()
    [ -n "${WINNERS:-}" ] && IFS=, read -ra winners <<< "$WINNERS"
    # ANCHOR_VARIANTS: switches timed against the default in the same pass ("ENV=V|ENV=V"), once each.
    variants=()
    [ -n "${ANCHOR_VARIANTS:-}" ] && variants=("VARIANTS=$ANCHOR_VARIANTS" "REPEAT=${ANCHOR_REPEAT:-1}")
    # WINNERS=BEFORE=1,REPEAT=1: the staged gpu-stage/mmreg-before.gz (an earlier build) against this one.
    if [ -f gpu-stage/mmreg-before.gz ]; then
      gunzip -kf gpu-stage/mmreg-before.gz && chmod +x gpu-stage/mmreg-before
    fi
    # The tuned products' test first (about a minute): it checks the path every product of 17+ rows
    # takes by default, and uses a picks file of its own (the bench's first process still times all).
    if [ -x gpu-stage/tests/tuned_gemm ]; then
      MMREG_TEST_MODES=cuda MMREG_TUNED_GEMM_LOG=1 timeout 90 gpu-stage/run.sh tuned_gemm --nocapture \
        > "$OUT/tuned-test.log" 2>&1
      echo "tuned products' test: exit $? at $((SECONDS - start)) s"
      grep -E "^test result|FAILED|panicked" "$OUT/tuned-test.log" | head -5
    fi
    bench anchor "$((LIMIT - (SECONDS - start)))" "${winners[@]}" "${variants[@]}" MODELS=LLaVA-1.5-7B BATCHES=1,8,32 ANCHOR=1 \
      ANCHOR_TIMEOUT=400
    table anchor
    [ -n "${SAME_TOKENS:-}" ] && same_tokens "$SAME_TOKENS"
    # The GPU tests in what is left of the call.
    left=$((LIMIT - (SECONDS - start)))
    if [ "$left" -gt 60 ]; then
      MMREG_TEST_MODES=cuda timeout "$left" gpu-stage/run.sh cuda_graphs > "$OUT/gpu-tests.log" 2>&1
      left=$((LIMIT - (SECONDS - start)))
      [ "$left" -gt 20 ] && MMREG_TEST_MODES=cuda timeout "$left" gpu-stage/run.sh fused_kernels --skip nvrtc \
        >> "$OUT/gpu-tests.log" 2>&1
      echo "GPU tests: exit $? at $((SECONDS - start)) s"
      grep -E "^test result|FAILED|panicked" "$OUT/gpu-tests.log" | head
    fi
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
echo "done at $((SECONDS - start)) s"
