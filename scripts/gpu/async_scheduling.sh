#!/usr/bin/env bash
# Async scheduling and pinned uploads on an H200 in one device call: the CUDA graph test (plain steps,
# CUDA graphs, and CUDA graphs with async scheduling give the same tokens, and some steps overlap) and
# the fused kernels' tests, then LLaVA-1.5-7B prefill and decode at batch 1, 8 and 32 as it runs by
# default (async scheduling on since run 61), with MMREG_ASYNC_SCHEDULING=0, with MMREG_ASYNC_UPLOADS=0
# (plain pageable copies, as before) and with MMREG_FUSED_QUICK_GELU=0 (libtorch's three ops in the
# vision tower), alternating REPEAT times (the JSON's decode_step/issue/wait/overlapped fields say where
# each step's time went); VARIANTS replaces that list. About 8 minutes of device time; ANCHOR=1 adds the
# compiled-PyTorch anchor (several more: run it in a call of its own).
# Stage here first: GPU_TESTS="cuda_graphs fused_kernels" scripts/gpu-stage.sh (device tool: carry
# ["gpu-stage"]).
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
cat gpu-stage/commit
{ MMREG_TEST_MODES=cuda timeout 80 gpu-stage/run.sh cuda_graphs --nocapture
  MMREG_TEST_MODES=cuda timeout 120 gpu-stage/run.sh fused_kernels; } > "$OUT/gpu-tests.log" 2>&1
echo "GPU tests: exit $?"
grep -E "^test result|FAILED|panicked|CUDA graphs:" "$OUT/gpu-tests.log" | head
MODELS=LLaVA-1.5-7B BATCHES=1,8,32 REPEAT=${REPEAT:-1} ANCHOR=${ANCHOR:-0} ANCHOR_TIMEOUT=300 \
  VARIANTS=${VARIANTS:-"MMREG_ASYNC_SCHEDULING=0|MMREG_ASYNC_UPLOADS=0|MMREG_FUSED_QUICK_GELU=0"} \
  timeout 380 python3 scripts/gpu/quick_bench.py gpu-stage/run.sh > "$OUT/quick-bench.log" 2>&1
echo "quick_bench: exit $?"
sed -n '/^## NVIDIA/,$p' "$OUT/quick-bench.log" | grep -E "^## |^\| (metric|prefill_bs|decode_tok)"
python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ["OUT"], "quick-bench.json")))
for p in d["models"]["LLaVA-1.5-7B"]["peers"]:
    r = p["result"]
    for b in (1, 8, 32):
        keys = [f"decode_{k}_bs{b}" for k in ("tok_per_s", "step_ms", "issue_ms", "wait_ms", "overlapped")]
        print(p["label"], b, {k.rsplit("_bs", 1)[0]: round(r[k], 3) for k in keys if k in r})
PY
