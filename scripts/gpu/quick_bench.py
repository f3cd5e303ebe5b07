"""A short GPU check (about 3 minutes on an H200): mmreg alone on the LLaVA-1.5-7B- and
LLaVA-NeXT-Mistral-7B-shaped checkpoints: prefill, embeddings, TTFT and decode at batch 1 and 8. No HF
side: compare with a full `bench.py` run on the same card type.
Usage on the GPU machine: python3 scripts/gpu/quick_bench.py gpu-stage/run.sh
With AB=1, each model also runs with the fused kernels (MMREG_FUSED_KERNELS=1), in the same call.
With BEFORE=1, each model also runs the staged `gpu-stage/mmreg-before` (a build of an earlier commit),
alternating before/after REPEAT times (default 2), so that a change is measured against its base on the
same card in one call; the raw JSON of every run goes to $OUT/quick-bench.json when OUT is set.
"""
import json
import os
import sys

import torch

sys.path.insert(0, "scripts/gpu")
import checkpoints  # noqa: E402
from bench_common import GEN, IMAGE15, IMAGE_NEXT, LLAVA, NEXT, PROMPT15, PROMPT_NEXT, mmreg  # noqa: E402

AB = os.environ.get("AB") == "1"
BEFORE = os.environ.get("BEFORE") == "1"
REPEAT = int(os.environ.get("REPEAT", "2"))
runs = []

for name, make, path, image, prompt in [("LLaVA-1.5-7B", checkpoints.llava15, LLAVA, IMAGE15, PROMPT15),
                                        ("LLaVA-NeXT-Mistral-7B", checkpoints.llava_next_mistral, NEXT,
                                         IMAGE_NEXT, PROMPT_NEXT)]:
    del_model = make(path)
    del del_model
    torch.cuda.empty_cache()
    args = ["bench", "--model", path, "--prompt", prompt, "--image", image, "--batch", "1,8",
            "--max-tokens", str(GEN), "--device", "cuda", "--dtype", "bf16"]
    if BEFORE:
        columns = {}
        for rep in range(REPEAT):
            for binary in ["mmreg-before", "mmreg"]:
                result = mmreg(args, binary=binary)
                runs.append({"model": name, "binary": binary, "rep": rep, "result": result})
                columns[f"{binary} #{rep + 1}"] = result
        print(f"## {torch.cuda.get_device_name(0)}: before/after, {name} shapes", flush=True)
        print("| metric | " + " | ".join(columns) + " |", flush=True)
        for key in sorted(columns[f"mmreg #1"]):
            cells = " | ".join(f"{c.get(key, float('nan')):.1f}" for c in columns.values())
            print(f"| {key} | {cells} |", flush=True)
        continue
    ours = mmreg(args)
    fused = mmreg(args, fused=True) if AB else {}
    runs.append({"model": name, "binary": "mmreg", "result": ours, "fused": fused})
    print(f"## {torch.cuda.get_device_name(0)}: mmreg, {name} shapes, prompt {ours.get('prompt_tokens')} tokens",
          flush=True)
    print("| metric | mmreg |" + (" with fused kernels |" if AB else ""), flush=True)
    for key, value in sorted(ours.items()):
        print(f"| {key} | {value:.1f} |" + (f" {fused.get(key, float('nan')):.1f} |" if AB else ""), flush=True)

if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "quick-bench.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "runs": runs}, f, indent=1)
