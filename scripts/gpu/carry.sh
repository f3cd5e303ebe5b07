#!/usr/bin/env bash
# Keeps what a device call carries under its 64-MiB cap: moves the tracked files that the GPU runs do not
# read out of the tree before the call, and back after it.
#   scripts/gpu/carry.sh aside     every tracked file of 300 KB or more, and of 60 KB or more outside
#                                  scripts/, mmreg-engine/csrc/ (the labs compile fused_kernels.cu)
#                                  and fixtures/llava-next-tiny-real/, moves to $MMREG_ASIDE
#                                  (/tmp/mmreg-aside), except what the GPU tests and benchmarks read:
#                                  fixtures/llava-tiny-real (the CUDA-graph test's checkpoint, the
#                                  benchmarks' tokenizer; not its goldens) and Mistral's tokenizer
#                                  (LLaVA-NeXT's checkpoint)
#   scripts/gpu/carry.sh restore   moves them back (always before building, testing or committing:
#                                  until then git status shows them deleted)
set -euo pipefail
cd "$(dirname "$0")/../.."
aside=${MMREG_ASIDE:-/tmp/mmreg-aside}
case "${1:-}" in
  aside)
    [ -f "$aside/list" ] && { echo "carry.sh: files are already aside (carry.sh restore first)" >&2; exit 1; }
    mkdir -p "$aside"
    : > "$aside/list"
    git ls-files -z | while IFS= read -r -d '' f; do
      [ -f "$f" ] || continue
      size=$(stat -c %s "$f")
      case "$f" in
        fixtures/llava-tiny-real/golden.safetensors | fixtures/llava-tiny-real/parity.safetensors) keep=small ;;
        fixtures/llava-tiny-real/* | fixtures/tokenizers/mistral/tokenizer.json) continue ;;
        fixtures/llava-next-tiny-real/* | scripts/* | mmreg-engine/csrc/*) keep=medium ;;
        *) keep=small ;;
      esac
      if [ "$size" -ge 300000 ] || { [ "$keep" = small ] && [ "$size" -ge 60000 ]; }; then
        mkdir -p "$aside/$(dirname "$f")"
        mv "$f" "$aside/$f"
        echo "$f" >> "$aside/list"
      fi
    done
    # What travels: tracked and untracked files that git does not ignore, and gpu-stage/.
    # (the files aside are still in git's index: stat skips them)
    tree=$(git ls-files -z --cached --others --exclude-standard | { xargs -0 stat -c %s 2>/dev/null || true; } |
      awk '{s += $1} END {print s + 0}')
    stage=$(du -sb gpu-stage 2>/dev/null | cut -f1)
    echo "carry.sh: $(wc -l < "$aside/list") files aside in $aside; the call carries" \
      "$(((tree + ${stage:-0}) >> 20)) MiB (gpu-stage/ $((${stage:-0} >> 20)) MiB)" ;;
  restore)
    [ -f "$aside/list" ] || { echo "carry.sh: nothing aside"; exit 0; }
    while IFS= read -r f; do
      [ -f "$aside/$f" ] && mkdir -p "$(dirname "$f")" && mv "$aside/$f" "$f"
    done < "$aside/list"
    rm -f "$aside/list"
    echo "carry.sh: restored" ;;
  *) echo "usage: scripts/gpu/carry.sh aside|restore" >&2; exit 2 ;;
esac
