#!/usr/bin/env bash
# Builds release binaries and test binaries here (the GPU machine has no Rust toolchain) and stages them,
# stripped, in the git-ignored folder gpu-stage/ with run.sh, which points them at that machine's torch.
# Usage on the GPU machine (device tool, carry: ["gpu-stage"]):  gpu-stage/run.sh            (all tests)
#                                                                 gpu-stage/run.sh mmreg ARGS (one binary)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
stage=gpu-stage
rm -rf "$stage" && mkdir -p "$stage/tests"

cargo build --release -p mmreg
cp "${CARGO_TARGET_DIR:-target}/release/mmreg" "$stage/"
# Test binaries worth running on a GPU (each a cargo test harness); the tree that travels is capped at
# 64 MiB, so only those named in $GPU_TESTS (default: the CUDA smoke, CUDA graph and fused kernel tests) are
# staged; GPU_TESTS=none stages the CLI alone.
tests=${GPU_TESTS:-cuda_smoke cuda_graphs fused_kernels fused_engine}
if [ "$tests" != none ]; then  # GPU_TESTS=none stages the CLI alone (a benchmark run)
cargo test --release --no-run --message-format=json -p mmreg-engine -p mmreg-models 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    # `ui` needs cargo (trybuild), which the GPU machine lacks.
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"] \
            and m["target"]["name"] != "ui":
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  case " $tests " in *" $name "*) cp "$exe" "$stage/tests/$name" ;; esac
done
fi
strip "$stage/mmreg" "$stage"/tests/* 2>/dev/null || true
cp -r scripts/gpu "$stage/scripts" 2>/dev/null || true
# The commit staged (the GPU machine gets the work tree without .git), for the benchmarks' JSON.
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)" > "$stage/commit"
# The compiled-PyTorch decode anchor (gpt-fast's recipe) that bench.py and quick_bench.py (ANCHOR=1) run:
# not our code, so it stays out of the repo and is staged from shared/.
anchor="$repo/../shared/bench/compiled_llama_anchor.py"
if [ -f "$anchor" ]; then
  mkdir -p "$stage/peers" && cp "$anchor" "$stage/peers/"
  echo "staged the compiled-PyTorch anchor: $stage/peers/compiled_llama_anchor.py"
else
  echo "note: $anchor is absent: the benchmarks will skip the compiled-PyTorch anchor"
fi

cat > "$stage/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs staged binaries against this machine's torch (pip torch 2.11.0, the version they were built for).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
torch_lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Tests read fixtures relative to the crate directories of the checkout.
export MMREG_REPO=${MMREG_REPO:-$(cd "$here/.." && pwd)}
if [ $# -gt 0 ]; then
  bin=$1; shift
  [ -x "$here/$bin" ] || bin=tests/$bin
  exec "$here/$bin" "$@"
fi
status=0
for t in "$here"/tests/*; do
  echo "== $(basename "$t")"
  "$t" --test-threads=1 --nocapture || status=1
done
exit $status
RUN
chmod +x "$stage/run.sh"
du -sh "$stage"
ls -la "$stage" "$stage/tests"
