"""LLaVA-1.5-7B-shaped parity on the GPU machine: random bf16 weights, HF transformers vs mmreg.

Makes a random checkpoint with the real llava-1.5-7b-hf shapes (saved by transformers, so in its own
layout), runs HF greedy generation (bf16, sdpa) for 32 tokens, then `mmreg generate` on the same
checkpoint and image, and applies vLLM's rule: until the first differing token, each side's token must
be in the other's top-5. Run from the repo root on the GPU machine, after staging binaries:
    python3 scripts/gpu/llava7b_parity.py gpu-stage/run.sh
"""
import json, os, shutil, subprocess, sys, time

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

RUN = sys.argv[1] if len(sys.argv) > 1 else "gpu-stage/run.sh"
CKPT = os.environ.get("CKPT", "/tmp/llava-1.5-7b-random")
FIXTURE = "fixtures/llava-tiny-real"
IMAGE = f"{FIXTURE}/images/b_480x640.png"
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
STEPS = 32


def make_checkpoint():
    config = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, image_size=336, intermediate_size=4096,
                           num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768),
        image_token_index=32000, pad_token_id=32001, vocab_size=32064, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.eval()
    t = time.time()
    model.save_pretrained(CKPT)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
              "processor_config.json"]:
        if os.path.exists(f"{FIXTURE}/{f}"):
            shutil.copy(f"{FIXTURE}/{f}", CKPT)
    print(f"checkpoint saved in {time.time() - t:.1f}s to {CKPT}", flush=True)
    return model


def hf_generate(model):
    processor = AutoProcessor.from_pretrained(CKPT, backend="pil")
    inputs = processor(images=Image.open(IMAGE), text=PROMPT, return_tensors="pt").to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        torch.cuda.synchronize(); t = time.time()
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
        torch.cuda.synchronize(); dt = time.time() - t
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    top5 = [s[0].topk(5).indices.tolist() for s in out.scores]
    print(f"HF: {len(tokens)} tokens in {dt:.2f}s (prompt {inputs['input_ids'].shape[1]} tokens)", flush=True)
    return tokens, top5


def mmreg_generate():
    cmd = [RUN, "mmreg", "generate", "--model", CKPT, "--image", IMAGE, "--prompt", PROMPT,
           "--max-tokens", str(STEPS), "--device", "cuda", "--dtype", "bf16", "--json", "--ignore-eos",
           "--top-logprobs", "5"]
    t = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.time() - t
    if out.returncode != 0:
        print(out.stdout, out.stderr)
        sys.exit(f"mmreg failed with {out.returncode}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"mmreg: {len(result['token_ids'])} tokens, whole process (load included) {dt:.1f}s", flush=True)
    return result["token_ids"], result["top_tokens"]


def vllm_rule(a, a_top, b, b_top):
    """Until the first differing token, each side's token is in the other's top-5."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            ok = x in b_top[i] and y in a_top[i]
            return ok, i
    return True, None


model = make_checkpoint()
hf_tokens, hf_top = hf_generate(model)
del model
torch.cuda.empty_cache()
ours, our_top = mmreg_generate()
ok, first_diff = vllm_rule(hf_tokens, hf_top, ours, our_top)
same = sum(1 for x, y in zip(hf_tokens, ours) if x == y)
print("HF    :", hf_tokens)
print("mmreg :", ours)
print(f"| check | result |\n|---|---|\n| identical tokens | {same}/{STEPS} |\n| first difference | {first_diff} |"
      f"\n| vLLM top-5 rule over {STEPS} tokens | {'PASS' if ok else 'FAIL'} |")
sys.exit(0 if ok else 1)
