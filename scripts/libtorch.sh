#!/usr/bin/env bash
# One-time set-up of libtorch for mmreg: pip's torch==2.11.0 (the version tch 0.24 binds) in a per-user cache,
# shared by every clone, and the git-ignored link `.libtorch` that `.cargo/config.toml` points torch-sys at.
# Idempotent: a second run only checks the link. Prints the libtorch directory.
set -euo pipefail
TORCH_VERSION=2.11.0
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${MMREG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmreg}
venv=$cache/torch-$TORCH_VERSION
python=${PYTHON:-python3}
# torch warns on import when numpy is absent; it is not needed here.
export PYTHONWARNINGS=ignore

if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "mmreg: installing torch==$TORCH_VERSION into $venv (once per user, about 3 GB)" >&2
    mkdir -p "$cache"
    rm -rf "$venv.partial"
    "$python" -m venv "$venv.partial"
    "$venv.partial/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
    rm -rf "$venv"
    mv "$venv.partial" "$venv"
    # A venv records its own path in scripts; moving it breaks pip but not python or the libraries we need.
fi
# c10d's NCCL header (tensor parallelism) includes CUDA's fp16 header, which needs CCCL's <nv/target>: the
# nvidia-cuda-cccl wheel (3 MB, headers only) puts it beside the CUDA headers torch already has.
CCCL_VERSION=13.0.85
if ! "$venv/bin/python" -m pip show nvidia-cuda-cccl 2>/dev/null | grep -q "^Version: $CCCL_VERSION"; then
    # Not fatal: without it the build leaves NCCL out (tensor parallelism on CPUs through Gloo still works).
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "nvidia-cuda-cccl==$CCCL_VERSION" \
        || echo "mmreg: could not install nvidia-cuda-cccl; tensor parallelism will have Gloo only (no NCCL)" >&2
fi
# cuDNN's attention called directly (mmreg-engine/csrc/cudnn_attention.cpp) is written against cudnn-frontend's
# C++ headers, which its wheel ships (with a Python module we do not use); cuDNN itself is torch's.
CUDNN_FRONTEND_VERSION=1.32.0
if ! "$venv/bin/python" -m pip show nvidia-cudnn-frontend 2>/dev/null | grep -q "^Version: $CUDNN_FRONTEND_VERSION"; then
    # Not fatal: without it attention stays libtorch's.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        "nvidia-cudnn-frontend==$CUDNN_FRONTEND_VERSION" \
        || echo "mmreg: could not install nvidia-cudnn-frontend; attention will be libtorch's" >&2
fi
torch_dir=$("$venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
if [ "$(readlink "$repo/.libtorch" 2>/dev/null)" != "$torch_dir" ]; then
    ln -sfn "$torch_dir" "$repo/.libtorch"
fi
# torch-sys checks the version through this file when LIBTORCH is set.
[ -f "$torch_dir/build-version" ] || echo "$TORCH_VERSION" > "$torch_dir/build-version"
echo "$torch_dir"
