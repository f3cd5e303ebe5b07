#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each): ./scripts/fuzz.sh [SECONDS]
# Needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP lets the stable toolchain accept the
# sanitizer flags it passes. Crashes land in fuzz/artifacts/<target>/: copy each into
# fuzz/regressions/<target>/ so that `cargo test -p mmreg-image --test fuzz_regressions` replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
mkdir -p fuzz/corpus/decode_and_preprocess
# Seed the image target with the fixtures' PNGs.
cp -n fixtures/images/*.png fuzz/corpus/decode_and_preprocess/ 2>/dev/null || true
for target in decode_and_preprocess preprocessor_config best_resolution; do
  echo "== $target ($seconds s)"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 2>&1 \
    | grep -E "^(#[0-9]+.*(DONE|pulse)|Done|==[0-9]+==|SUMMARY|artifact)" | tail -n 3
done
