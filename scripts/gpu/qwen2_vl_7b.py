"""Qwen2-VL-7B-shaped random bf16 checkpoint on the GPU machine, HF transformers vs mmreg in one run:

1. bf16 agreement by vLLM's top-5 rule at every one of 32 greedy steps, teacher-forced on HF's tokens:
   HF generates 32 tokens (its scores at step k are conditioned on its own first k tokens); mmreg gets 32
   requests, the prompt's token ids plus HF's first k tokens, one new token each with its top-5. Step k
   passes when both pick the same token, or each side's pick is in the other's top-5.
2. Prefill (last-token logits, as `generate()` computes them) and greedy decode, batch 1 and 8, for HF
   (`generate()`, sdpa, dynamic cache) and `mmreg bench`.

Usage on the GPU machine, from the repo root, after staging the mmreg binary:
    python3 scripts/gpu/qwen2_vl_7b.py gpu-stage/run.sh      (writes $OUT/qwen2-vl-7b.json when OUT is set)
"""
import json, os, shutil, subprocess, sys, tempfile, time

import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoProcessor, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

RUN = sys.argv[1] if len(sys.argv) > 1 else "gpu-stage/run.sh"
# MODEL=qwen2_5 runs the same checks on Qwen2.5-VL-7B's shapes (windowed ViT attention).
QWEN25 = os.environ.get("MODEL") == "qwen2_5"
NAME = "Qwen2.5-VL-7B" if QWEN25 else "Qwen2-VL-7B"
MODEL_CLASS = Qwen2_5_VLForConditionalGeneration if QWEN25 else Qwen2VLForConditionalGeneration
CKPT = os.environ.get("CKPT", "/tmp/qwen2_5-vl-7b-random" if QWEN25 else "/tmp/qwen2-vl-7b-random")
FIXTURE = "fixtures/qwen2-vl-tiny"
IMAGE = "fixtures/images/next_480x640.png"
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>Describe this image in detail.<|im_end|>\n"
          "<|im_start|>assistant\n")
STEPS = 32
DECODE = 64
# Qwen2-VL-7B-Instruct's image processor settings.
PROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
             "temporal_patch_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "do_rescale": True,
             "rescale_factor": 0.00392156862745098, "do_normalize": True, "do_convert_rgb": True,
             "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}


def make_checkpoint():
    if QWEN25:
        return make_checkpoint_25()
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                         max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4,
                           hidden_act="quick_gelu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False)
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    return save(config)


def make_checkpoint_25():
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                         max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                           out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return save(config)


def save(config):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MODEL_CLASS._from_config(config, dtype=torch.bfloat16)
    model.eval()
    t = time.time()
    model.save_pretrained(CKPT)
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]:
        shutil.copy(os.path.realpath(f"{FIXTURE}/{f}"), CKPT)
    with open(f"{CKPT}/preprocessor_config.json", "w") as f:
        json.dump(PROCESSOR, f)
    print(f"checkpoint saved in {time.time() - t:.1f}s to {CKPT}", flush=True)
    return model


def processor():
    image_processor = AutoImageProcessor.from_pretrained(CKPT, backend="pil")
    return AutoProcessor.from_pretrained(CKPT, image_processor=image_processor)


def hf_inputs(proc, batch):
    image = Image.open(IMAGE).convert("RGB")
    inputs = proc(images=[image] * batch, text=[PROMPT] * batch, return_tensors="pt").to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return inputs


def hf_greedy(model, proc):
    inputs = hf_inputs(proc, 1)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    top5 = [s[0].float().topk(5).indices.tolist() for s in out.scores]
    return tokens, top5, inputs["input_ids"].shape[1]


def timed(f, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize(); t = time.time()
        f()
        torch.cuda.synchronize(); best = min(best, time.time() - t)
    return best


def hf_bench(model, proc):
    out = {}
    for batch in (1, 8):
        inputs = hf_inputs(proc, batch)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
            prefill = timed(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False,
                                                   eos_token_id=None))
            total = timed(lambda: model.generate(**inputs, max_new_tokens=DECODE, do_sample=False,
                                                 eos_token_id=None), repeat=2)
        out[f"prefill_bs{batch}_ms"] = prefill * 1e3
        out[f"decode_tok_per_s_bs{batch}"] = batch * (DECODE - 1) / (total - prefill)
        print(f"HF batch {batch}: prefill {prefill * 1e3:.1f} ms, decode {out[f'decode_tok_per_s_bs{batch}']:.1f}"
              f" tok/s", flush=True)
    return out


def mmreg(args):
    out = subprocess.run([RUN, "mmreg", *args], capture_output=True, text=True)
    sys.stderr.write(out.stderr[-3000:])
    if out.returncode != 0:
        print(out.stdout[-3000:])
        sys.exit(f"mmreg {args[0]} failed with {out.returncode}")
    return out.stdout


def mmreg_teacher_forced(prompt_ids, hf_tokens):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for k in range(STEPS):
            f.write(json.dumps({"prompt_token_ids": prompt_ids + hf_tokens[:k], "images": [IMAGE],
                                "max_tokens": 1}) + "\n")
        path = f.name
    lines = mmreg(["generate", "--model", CKPT, "--requests", path, "--top-logprobs", "5", "--device", "cuda",
                   "--dtype", "bf16", "--max-model-len", "4096", "--max-tokens", "1"]).strip().splitlines()
    results = [json.loads(l) for l in lines]
    return [r["token_ids"][0] for r in results], [r["top_tokens"][0] for r in results]


def main():
    if not os.path.exists(f"{CKPT}/config.json"):
        model = make_checkpoint()
    else:
        model = MODEL_CLASS.from_pretrained(CKPT, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    proc = processor()
    hf_tokens, hf_top5, prompt_len = hf_greedy(model, proc)
    prompt_ids = proc.tokenizer(PROMPT).input_ids
    hf = hf_bench(model, proc)
    del model
    torch.cuda.empty_cache()

    ours, ours_top5 = mmreg_teacher_forced(prompt_ids, hf_tokens)
    steps = []
    for k in range(STEPS):
        same = ours[k] == hf_tokens[k]
        crossed = ours[k] in hf_top5[k] and hf_tokens[k] in ours_top5[k]
        steps.append(same or crossed)
    agree = sum(steps)
    print(f"agreement (vLLM top-5 rule, teacher-forced): {agree}/{STEPS} steps pass; identical picks "
          f"{sum(a == b for a, b in zip(ours, hf_tokens))}/{STEPS}", flush=True)

    bench = json.loads(mmreg(["bench", "--model", CKPT, "--image", IMAGE, "--prompt", PROMPT, "--batch", "1,8",
                              "--max-tokens", str(DECODE), "--device", "cuda", "--dtype", "bf16"])
                       .strip().splitlines()[-1])
    print(f"## {torch.cuda.get_device_name(0)}: {NAME} shapes, random bf16, prompt {prompt_len} tokens "
          f"(one 480x640 image)")
    print("| metric | mmreg | HF transformers (generate, sdpa) |")
    for key in ["prefill_bs1_ms", "prefill_bs8_ms", "decode_tok_per_s_bs1", "decode_tok_per_s_bs8"]:
        print(f"| {key} | {bench.get(key, float('nan')):.1f} | {hf[key]:.1f} |")
    print(f"| top-5 agreement, steps | {agree}/{STEPS} | |")
    result = {"gpu": torch.cuda.get_device_name(0), "model": NAME, "prompt_tokens": prompt_len, "hf": hf,
              "mmreg": bench,
              "agreement": {"steps": STEPS, "pass": agree, "per_step": steps, "hf_tokens": hf_tokens,
                            "mmreg_tokens": ours, "hf_top5": hf_top5, "mmreg_top5": ours_top5}}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"{NAME.lower()}.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
