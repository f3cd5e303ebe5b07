#!/usr/bin/env bash
# A change measured against its base in one device call: every staged GPU test of the current build,
# then both 7B-shaped checkpoints at batch 1 and 8 with the staged `mmreg-before` (a release build of the
# base commit, copied into gpu-stage/ by hand) and the current `mmreg`, alternating (BEFORE=1
# quick_bench.py). Raw JSON lands in $OUT/quick-bench.json.
# Usage on the GPU machine, from the repo root (carry: ["gpu-stage"]):  scripts/gpu/before_after.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
logs=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# The kernels' tests on the GPU alone (their fallback and emulator passes are CI's; MMREG_TEST_MODES=all
# keeps every pass).
export MMREG_TEST_MODES=${MMREG_TEST_MODES:-cuda}
[ "$MMREG_TEST_MODES" = all ] && unset MMREG_TEST_MODES
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  gpu-stage/run.sh > "$logs/gpu-tests.log" 2>&1
  echo "GPU tests: exit $?"
  grep -E "^== |^test .*(ok|FAILED)$|^test result|panicked|SKIPPED|unavailable" "$logs/gpu-tests.log"
fi
BEFORE=1 python3 scripts/gpu/quick_bench.py gpu-stage/run.sh > "$logs/quick-before-after.log" 2>&1
echo "quick_bench (before/after): exit $?"
grep -E "^\||^##|WARN|warn|rror" "$logs/quick-before-after.log" | head -80
