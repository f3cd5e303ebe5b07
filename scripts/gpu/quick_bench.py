"""A short GPU check (about 3 minutes on an H200): mmreg alone on the LLaVA-1.5-7B- and
LLaVA-NeXT-Mistral-7B-shaped checkpoints: prefill, embeddings, TTFT and decode at batch 1 and 8. No HF
side: compare with a full `bench.py` run on the same card type.
Usage on the GPU machine: python3 scripts/gpu/quick_bench.py gpu-stage/run.sh
With AB=1, each model also runs with the fused kernels (MMREG_FUSED_KERNELS=1), in the same call.
"""
import os
import sys

import torch

sys.path.insert(0, "scripts/gpu")
import checkpoints  # noqa: E402
from bench_common import GEN, IMAGE15, IMAGE_NEXT, LLAVA, NEXT, PROMPT15, PROMPT_NEXT, mmreg  # noqa: E402

AB = os.environ.get("AB") == "1"

for name, make, path, image, prompt in [("LLaVA-1.5-7B", checkpoints.llava15, LLAVA, IMAGE15, PROMPT15),
                                        ("LLaVA-NeXT-Mistral-7B", checkpoints.llava_next_mistral, NEXT,
                                         IMAGE_NEXT, PROMPT_NEXT)]:
    del_model = make(path)
    del del_model
    torch.cuda.empty_cache()
    args = ["bench", "--model", path, "--prompt", prompt, "--image", image, "--batch", "1,8",
            "--max-tokens", str(GEN), "--device", "cuda", "--dtype", "bf16"]
    ours = mmreg(args)
    fused = mmreg(args, fused=True) if AB else {}
    print(f"## {torch.cuda.get_device_name(0)}: mmreg, {name} shapes, prompt {ours.get('prompt_tokens')} tokens",
          flush=True)
    print("| metric | mmreg |" + (" with fused kernels |" if AB else ""), flush=True)
    for key, value in sorted(ours.items()):
        print(f"| {key} | {value:.1f} |" + (f" {fused.get(key, float('nan')):.1f} |" if AB else ""), flush=True)
