#!/usr/bin/env bash
# Runs fuzz targets for a bounded time each and prints, per target, the number of runs and the outcome:
#   ./scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 60 s, every target)
# Needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP lets the stable toolchain accept the
# sanitizer flags it passes. Each corpus (fuzz/corpus/<target>/) is seeded with the saved cases of
# fuzz/regressions/<target>/. A crash stops its target and lands in fuzz/artifacts/<target>/: once fixed,
# copy it into fuzz/regressions/<target>/ so that the crate's `fuzz_regressions` test replays it.
# The full libFuzzer output of each target is kept in fuzz/artifacts/<target>/fuzz.log.
#
# input_processor, checkpoint_config and safetensors_header link libtorch (through mmreg-core and
# mmreg-models). Its shared libraries are not instrumented, which AddressSanitizer and LeakSanitizer
# tolerate: the Rust side is checked and coverage comes from the Rust code. With libtorch loaded their
# resident memory is 0.6 to 1 GB, under the 2 GB limit below.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(decode_and_preprocess preprocessor_config best_resolution input_processor checkpoint_config safetensors_header)
fi

mkdir -p fuzz/corpus/decode_and_preprocess
# Seed the image target with the fixtures' PNGs.
cp -n fixtures/images/*.png fuzz/corpus/decode_and_preprocess/ 2>/dev/null || true

failed=0
summary=()
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  if [ -d "fuzz/regressions/$target" ]; then
    cp -n "fuzz/regressions/$target"/* "fuzz/corpus/$target/" 2>/dev/null || true
  fi
  log="fuzz/artifacts/$target/fuzz.log"
  echo "== $target ($seconds s)"
  status=0
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
    -timeout=10 >"$log" 2>&1 || status=$?
  # "Done N runs" ends a run that found nothing; otherwise the last status line has the count.
  runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
  if [ -z "$runs" ]; then
    runs=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -n 1)
  fi
  artifact=$(sed -n 's/.*Test unit written to \(.*\)/\1/p' "$log" | tail -n 1)
  if [ "$status" -eq 0 ]; then
    outcome="no crash"
  else
    failed=1
    outcome="CRASH ${artifact:-(no artifact: see $log)}"
    grep -E "^(thread '.*panicked|==[0-9]+==ERROR|SUMMARY)" "$log" | head -n 3 || true
  fi
  summary+=("$(printf '%-24s %12s runs  %s' "$target" "${runs:-?}" "$outcome")")
done

echo
printf '%s\n' "${summary[@]}"
exit "$failed"
