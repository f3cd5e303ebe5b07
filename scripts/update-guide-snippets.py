#!/usr/bin/env python3
"""Refreshes the Rust blocks of docs/adding-a-multimodal-model.md from the sources they quote.

Each block is re-read from the source file that contains its first line, through the end of that item
(the next line that is a lone `}`). `examples/toy-vlm/tests/guide.rs` checks the result.
"""
import pathlib, re

root = pathlib.Path(__file__).resolve().parent.parent
guide = root / "docs/adding-a-multimodal-model.md"
sources = [(root / p).read_text() for p in ["mmreg-models/src/llava.rs", "examples/toy-vlm/src/lib.rs", "mmreg-models/src/qwen2_vl.rs"]]


def current(block: str) -> str:
    first = block.splitlines()[0]
    for src in sources:
        lines = src.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.rstrip("\n") == first:
                end = next(j for j in range(i, len(lines)) if lines[j].rstrip("\n") == "}")
                return "".join(lines[i:end + 1])
    raise SystemExit(f"no source holds the block starting with: {first}")


text = guide.read_text()
text = re.sub(r"```rust\n(.*?)```", lambda m: "```rust\n" + current(m.group(1)) + "```", text, flags=re.S)
guide.write_text(text)
