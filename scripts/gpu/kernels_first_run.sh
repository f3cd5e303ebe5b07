#!/usr/bin/env bash
# The first GPU run of the opt-in kernels (docs/benchmarks.md, "Kernels of our own"), in one device call:
# every staged GPU test (the fused kernels against libtorch, alone, in the engine and inside CUDA graphs),
# then mmreg with and without the kernels on both 7B-shaped checkpoints, same card (AB=1 quick_bench.py).
# Usage on the GPU machine, from the repo root, after `make gpu-stage` here (carry: ["gpu-stage"]):
#   scripts/gpu/kernels_first_run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
logs=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# The kernels' tests on the GPU alone (their fallback and emulator passes are CI's; MMREG_TEST_MODES=all
# keeps every pass).
export MMREG_TEST_MODES=${MMREG_TEST_MODES:-cuda}
[ "$MMREG_TEST_MODES" = all ] && unset MMREG_TEST_MODES
gpu-stage/run.sh > "$logs/gpu-tests.log" 2>&1
echo "GPU tests: exit $?"
grep -E "^== |^test .*(ok|FAILED)$|^test result|panicked|SKIPPED|unavailable" "$logs/gpu-tests.log"
AB=1 python3 scripts/gpu/quick_bench.py gpu-stage/run.sh > "$logs/quick-ab.log" 2>&1
echo "quick_bench (AB): exit $?"
grep -E "^\||^##|WARN|warn|error" "$logs/quick-ab.log" | head -80
