"""Qwen2-VL-7B-shaped random bf16 checkpoint on the GPU machine, HF transformers vs mmreg in one run:

1. bf16 agreement by vLLM's top-5 rule at every one of 32 greedy steps, teacher-forced on HF's tokens
   (bench_common.agreement): HF generates 32 tokens; mmreg gets 32 requests, the prompt's token ids plus
   HF's first k tokens, one new token each with its top-5.
2. Prefill (last-token logits, as `generate()` computes them) and greedy decode, batch 1 and 8, for HF
   (`generate()`, sdpa, dynamic cache) and `mmreg bench`.

Usage on the GPU machine, from the repo root, after staging the mmreg binary:
    python3 scripts/gpu/qwen2_vl_7b.py gpu-stage/run.sh      (writes $OUT/qwen2-vl-7b.json when OUT is set)
"""
import json, os, shutil, sys, time

import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoProcessor, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

sys.path.insert(0, "scripts/gpu")
from bench_common import agreement, hf_bench, hf_greedy, mmreg_bench, print_table, record, write_json  # noqa: E402

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


def main():
    if not os.path.exists(f"{CKPT}/config.json"):
        model = make_checkpoint()
    else:  # .to: device_map needs accelerate
        model = MODEL_CLASS.from_pretrained(CKPT, dtype=torch.bfloat16).to("cuda")
    model.eval()
    proc = processor()
    inputs = hf_inputs(proc, 1)
    prompt_len = inputs["input_ids"].shape[1]
    hf_tokens, hf_top5 = hf_greedy(model, inputs)
    prompt_ids = proc.tokenizer(PROMPT).input_ids  # one <|image_pad|>, as vLLM's prompt_token_ids
    hf = hf_bench(model, lambda b: hf_inputs(proc, b), (1, 8), gen=DECODE)
    hf["result"]["prompt_tokens"] = prompt_len
    del model
    torch.cuda.empty_cache()

    agree = agreement(CKPT, IMAGE, prompt_ids, hf_tokens, hf_top5)
    ours = mmreg_bench(CKPT, PROMPT, IMAGE, "1,8", gen=DECODE)
    result = record(NAME.lower())
    result["models"][NAME] = {"prompt": PROMPT, "image": IMAGE, "peers": [ours, hf], "agreement": [agree]}
    print_table(f"{result['gpu']}: {NAME} shapes, random bf16, prompt {prompt_len} tokens (one 480x640 image)",
                [ours, hf])
    write_json(f"{NAME.lower()}.json", result)


if __name__ == "__main__":
    main()
