"""The GPU benchmark and bf16 parity run, in one go (see docs/benchmarks.md).

For LLaVA-1.5-7B shapes: HF transformers (bf16, sdpa) and mmreg on the same random checkpoint: prefill
at batch 1, 8 and 32, decode tokens/s at batch 1, 8 and 32 (128 tokens), peak memory; the same mmreg build
without CUDA graphs, and with the opt-in fused kernels, at batch 1 and 8. For both LLaVA-1.5-7B and
LLaVA-NeXT-Mistral-7B shapes: bf16 greedy agreement with HF by vLLM's top-5 rule over 32 tokens, with and
without the fused kernels.
Run from the repo root on the GPU machine after staging binaries:  python3 scripts/gpu/bench.py gpu-stage/run.sh
"""
import sys, time

import torch
from PIL import Image
from transformers import AutoProcessor

sys.path.insert(0, "scripts/gpu")
import checkpoints  # noqa: E402
from bench_common import (GEN, IMAGE15, IMAGE_NEXT, LLAVA, NEXT, PROMPT15, PROMPT_NEXT, TRACES,  # noqa: E402
                          mmreg)

sync = torch.cuda.synchronize


def hf_bench(model, processor, image, prompt, batches):
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt").to("cuda")
    print("HF prompt tokens", inputs["input_ids"].shape[1], flush=True)
    res = {}
    with torch.inference_mode():
        for b in batches:
            batch = {k: v.repeat(b, *[1] * (v.dim() - 1)) for k, v in inputs.items()}
            batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
            for _ in range(3):
                model(**batch)
            sync(); t = time.perf_counter()
            for _ in range(5):
                model(**batch)
            sync(); prefill = (time.perf_counter() - t) / 5
            res[f"prefill_bs{b}_ms"] = prefill * 1000
            model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            sync(); t = time.perf_counter()
            model.generate(**batch, max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
            sync(); el = time.perf_counter() - t
            res[f"decode_tok_per_s_bs{b}"] = b * (GEN - 1) / (el - prefill)
            print("HF", res, flush=True)
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def vllm_rule(a, a_top, b, b_top):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return (x in b_top[i] and y in a_top[i]), i
    return True, None


def hf_greedy(model, processor, image, prompt, steps=32):
    """HF's greedy tokens and each step's top-5 ids (bf16), for vLLM's top-5 rule."""
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt").to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, [s[0].topk(5).indices.tolist() for s in out.scores]


def mmreg_agreement(ckpt, image, prompt, hf_tokens, hf_top, fused=False):
    ours = mmreg(["generate", "--model", ckpt, "--image", image, "--prompt", prompt, "--max-tokens", "32",
                  "--device", "cuda", "--dtype", "bf16", "--json", "--ignore-eos", "--top-logprobs", "5"],
                 fused=fused)
    ok, first = vllm_rule(hf_tokens, hf_top, ours["token_ids"], ours["top_tokens"])
    same = sum(x == y for x, y in zip(hf_tokens, ours["token_ids"]))
    return ok, first, same, ours["token_ids"]


card = torch.cuda.get_device_name(0)
model = checkpoints.llava15(LLAVA)
processor = AutoProcessor.from_pretrained(LLAVA, backend="pil")
hf = hf_bench(model, processor, IMAGE15, PROMPT15, (1, 8, 32))
hf15_tokens, hf15_top = hf_greedy(model, processor, IMAGE15, PROMPT15)
del model
torch.cuda.empty_cache()
ours = mmreg(["bench", "--model", LLAVA, "--prompt", PROMPT15, "--image", IMAGE15, "--batch", "1,8,32",
              "--max-tokens", str(GEN), "--device", "cuda", "--dtype", "bf16", "--trace", TRACES])
print("mmreg", ours, flush=True)
eager = mmreg(["bench", "--model", LLAVA, "--prompt", PROMPT15, "--image", IMAGE15, "--batch", "1,8",
               "--max-tokens", str(GEN), "--device", "cuda", "--dtype", "bf16"], eager=True)
print("mmreg eager", eager, flush=True)
fused = mmreg(["bench", "--model", LLAVA, "--prompt", PROMPT15, "--image", IMAGE15, "--batch", "1,8",
               "--max-tokens", str(GEN), "--device", "cuda", "--dtype", "bf16", "--trace", TRACES + "-fused"],
              fused=True)
print("mmreg fused", fused, flush=True)
ok15, first15, same15, ours15 = mmreg_agreement(LLAVA, IMAGE15, PROMPT15, hf15_tokens, hf15_top)
ok15f, first15f, same15f, _ = mmreg_agreement(LLAVA, IMAGE15, PROMPT15, hf15_tokens, hf15_top, fused=True)

model = checkpoints.llava_next_mistral(NEXT)
processor = AutoProcessor.from_pretrained(NEXT, backend="pil")
hf_tokens, hf_top = hf_greedy(model, processor, IMAGE_NEXT, PROMPT_NEXT)
hf_nx = hf_bench(model, processor, IMAGE_NEXT, PROMPT_NEXT, (1, 8))
del model
torch.cuda.empty_cache()
ours_nx = mmreg(["bench", "--model", NEXT, "--prompt", PROMPT_NEXT, "--image", IMAGE_NEXT, "--batch", "1,8",
                 "--max-tokens", str(GEN), "--device", "cuda", "--dtype", "bf16"])
print("mmreg NeXT", ours_nx, flush=True)
ok, first, same, nx_tokens = mmreg_agreement(NEXT, IMAGE_NEXT, PROMPT_NEXT, hf_tokens, hf_top)
okf, firstf, samef, _ = mmreg_agreement(NEXT, IMAGE_NEXT, PROMPT_NEXT, hf_tokens, hf_top, fused=True)
print(f"\n## {card}, {time.strftime('%Y-%m-%d')}, LLaVA-1.5-7B shapes, bf16, prompt {ours.get('prompt_tokens')} tokens")
print("| metric | HF transformers (sdpa) | mmreg | mmreg without CUDA graphs | mmreg with fused kernels |\n"
      "|---|---|---|---|---|")
nan = float("nan")
for key in ["prefill_bs1_ms", "prefill_embed_bs1_ms", "prefill_bs8_ms", "prefill_embed_bs8_ms", "prefill_bs32_ms",
            "ttft_bs1_ms", "ttft_bs8_ms", "ttft_bs32_ms",
            "decode_tok_per_s_bs1", "decode_tok_per_s_bs8", "decode_tok_per_s_bs32", "peak_mem_gib"]:
    print(f"| {key} | {hf.get(key, nan):.1f} | {ours.get(key, nan):.1f} | {eager.get(key, nan):.1f} | "
          f"{fused.get(key, nan):.1f} |")
print(f"\nLLaVA-1.5-7B shapes, bf16 greedy vs HF: identical {same15}/32, first difference {first15}, "
      f"vLLM top-5 rule: {'PASS' if ok15 else 'FAIL'}; with the fused kernels: identical {same15f}/32, "
      f"first difference {first15f}, {'PASS' if ok15f else 'FAIL'}")
print(f"\n## LLaVA-NeXT-Mistral-7B shapes, bf16, 480x640 image, prompt {ours_nx.get('prompt_tokens')} tokens")
print("| metric | HF transformers (sdpa) | mmreg |\n|---|---|---|")
for key in ["prefill_bs1_ms", "prefill_embed_bs1_ms", "prefill_bs8_ms", "decode_tok_per_s_bs1",
            "decode_tok_per_s_bs8"]:
    print(f"| {key} | {hf_nx.get(key, nan):.1f} | {ours_nx.get(key, nan):.1f} |")
print(f"\nLLaVA-NeXT-Mistral-7B shapes, bf16 greedy vs HF: identical {same}/32, first difference {first}, "
      f"vLLM top-5 rule: {'PASS' if ok else 'FAIL'}; with the fused kernels: identical {samef}/32, "
      f"first difference {firstf}, {'PASS' if okf else 'FAIL'}")
print("HF   :", hf_tokens)
print("mmreg:", nx_tokens)
