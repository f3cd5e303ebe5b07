#!/usr/bin/env bash
# Issue #18, the kernels of our own at decode, in one device call: the staged GPU tests (the kernels
# against libtorch, in the engine, in CUDA graphs), then scripts/gpu/decode_kernels.py (mmreg with and
# without the fused kernels on both 7B shapes, the top-5 agreement with HF, traces, the anchor).
# Usage on the GPU machine, from the repo root, after scripts/gpu-stage.sh (carry: ["gpu-stage"]):
#   scripts/gpu/decode_kernels.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# The kernels' tests on the GPU alone (their fallback and emulator passes are CI's; MMREG_TEST_MODES=all
# keeps every pass).
export MMREG_TEST_MODES=${MMREG_TEST_MODES:-cuda}
[ "$MMREG_TEST_MODES" = all ] && unset MMREG_TEST_MODES
[ "${TESTS:-1}" = 0 ] || timeout ${TEST_TIMEOUT:-180} gpu-stage/run.sh > "$out/gpu-tests.log" 2>&1
echo "GPU tests: exit $?"
grep -E "^== |^test .*(ok|FAILED)$|^test result|panicked|SKIPPED|unavailable" "$out/gpu-tests.log" | grep -v " ok$"
PYTHONUNBUFFERED=1 python3 scripts/gpu/decode_kernels.py gpu-stage/run.sh
