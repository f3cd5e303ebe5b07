"""Tensor parallelism on the GPU machine: mmreg at TP = 1, 2, 4, 8 (as many as the GPUs allow), against TP=1.

For each size N:
1. bf16 agreement with TP=1 by vLLM's top-5 rule at every one of 32 teacher-forced steps: TP=1 generates 32
   greedy tokens with its top-5; TP=N gets 32 requests (the prompt's ids plus TP=1's first k tokens, one new
   token each with its top-5). Step k passes when both pick the same token, or each pick is in the other's top-5.
2. `mmreg bench` prefill and decode at batch 1, 8 and 32.

On one GPU, TP=1 also runs with MMREG_TP_GROUP=1: a NCCL group of one rank, so the layers' collectives (all-reduce
after o_proj and down_proj, the vocab-parallel embedding and LM head) run through c10d/NCCL and are captured
inside the decode steps' CUDA graphs, as every rank of a larger group runs them.

Shapes (SHAPES=7b|34b|72b, random bf16 weights made here by transformers): 7b is llava-1.5-7b-hf (Vicuna-7B, 32
heads); 34b is llava-v1.6-34b-hf's decoder (Yi-34B: 60 layers, hidden 7168, 56 heads, 8 kv heads, intermediate
20480, vocabulary 64000; its 56 heads split over 2, 4 and 8 ranks); 72b is a Qwen2-72B decoder (80 layers, hidden
8192, 64 heads, 8 kv heads, intermediate 29568) under the same CLIP tower and projector (LlavaNext layout): the
decoder shapes are what tensor parallelism splits.
Usage, from the repo root:  python3 scripts/gpu/tensor_parallel.py gpu-stage/run.sh   (writes $OUT/tp-<shapes>.json)
"""
import json, os, shutil, subprocess, sys, tempfile, time

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, \
    LlavaNextForConditionalGeneration

RUN = sys.argv[1] if len(sys.argv) > 1 else "gpu-stage/run.sh"
SHAPES = os.environ.get("SHAPES", "7b")
IMAGE = "fixtures/images/next_480x640.png"
PROMPT = "USER: <image>\nDescribe this image in detail. ASSISTANT:"
STEPS = 32
VISION = dict(model_type="clip_vision_model", hidden_size=1024, image_size=336, intermediate_size=4096,
              num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768)
COMMON = dict(image_token_index=32000, pad_token_id=32001, projector_hidden_act="gelu", vision_feature_layer=-2,
              vision_feature_select_strategy="default", tie_word_embeddings=False)
DECODERS = {
    "34b": dict(model_type="llama", hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                num_attention_heads=56, num_key_value_heads=8, rope_theta=5e6, max_position_embeddings=4096,
                rms_norm_eps=1e-5),
    "72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, rope_theta=1e6, max_position_embeddings=4096,
                rms_norm_eps=1e-6),
}


def checkpoint(path):
    fixture = "fixtures/llava-tiny-real"
    if SHAPES == "7b":
        config = LlavaConfig(text_config=dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096,
                                              rms_norm_eps=1e-5), vision_config=VISION, vocab_size=32064, **COMMON)
        config.architectures = ["LlavaForConditionalGeneration"]
        model_class = LlavaForConditionalGeneration
    else:
        # The fixture's Llama-2 vocabulary (with <image>) stands in for the real one: same decoder shapes otherwise.
        config = LlavaNextConfig(text_config=dict(vocab_size=32064, **DECODERS[SHAPES]), vision_config=VISION,
                                 vocab_size=32064, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672]],
                                 **COMMON)
        config.architectures = ["LlavaNextForConditionalGeneration"]
        model_class = LlavaNextForConditionalGeneration
        fixture = "fixtures/llava-next-tiny-real"
    torch.manual_seed(0)
    t = time.time()
    with torch.device("cuda"):
        model = model_class._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    for f in os.listdir(fixture):
        if f.endswith(".json") and f not in ("config.json", "parity.json", "golden.json", "generation_config.json",
                                             "model.safetensors.index.json"):
            shutil.copy(os.path.join(fixture, f), path)
    del model
    torch.cuda.empty_cache()
    print(f"{SHAPES}: checkpoint saved in {time.time() - t:.1f}s", flush=True)
    return config.text_config.num_attention_heads


def mmreg(args, env=None):
    out = subprocess.run([RUN, "mmreg", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    sys.stderr.write(out.stderr[-2000:])
    if out.returncode != 0:
        print(out.stdout[-2000:])
        raise RuntimeError(f"mmreg {args[0]} failed with {out.returncode}")
    return out.stdout


def top5_steps(ckpt, tp, prompt_ids, tokens, env=None, extra=()):
    """TP=tp's pick and top-5 at each teacher-forced step on `tokens`."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for k in range(STEPS):
            f.write(json.dumps({"prompt_token_ids": prompt_ids + tokens[:k], "images": [IMAGE], "max_tokens": 1})
                    + "\n")
        path = f.name
    lines = mmreg(["generate", "--model", ckpt, "--requests", path, "--top-logprobs", "5", "--device", "cuda",
                   "--dtype", "bf16", "--max-model-len", "4096", "--max-tokens", "1",
                   "--tensor-parallel-size", str(tp), *extra], env).strip().splitlines()
    results = [json.loads(l) for l in lines]
    return [r["token_ids"][0] for r in results], [r["top_tokens"][0] for r in results]


def main():
    ckpt = f"/tmp/tp-{SHAPES}"
    heads = checkpoint(ckpt)
    proc = AutoProcessor.from_pretrained(ckpt)
    prompt_ids = proc(images=[Image.open(IMAGE).convert("RGB")], text=[PROMPT], return_tensors="pt")["input_ids"][0]
    # One <image> marker (mmreg's LLaVA input processor expands it; HF's processor already did).
    ids = prompt_ids.tolist()
    prompt_ids = [t for i, t in enumerate(ids) if not (t == 32000 and i and ids[i - 1] == 32000)]
    gpus = torch.cuda.device_count()
    one = {"MMREG_TP_GROUP": "1"}
    variants = [("TP=1", 1, None, []), ("TP=1, NCCL group of one", 1, one, []),
                ("TP=1, NCCL group of one, tower weights", 1, one, ["--mm-encoder-tp-mode", "weights"])]
    sizes = [n for n in (2, 4, 8) if n <= gpus and heads % n == 0]
    variants += [(f"TP={n}", n, None, []) for n in sizes]
    # The vision tower's three modes at the largest size (rank0 is the default above).
    variants += [(f"TP={n}, tower {mode}", n, None, ["--mm-encoder-tp-mode", mode])
                 for n in sizes[-1:] for mode in ("data", "weights")]
    # The reference: TP=1's own greedy tokens, then each variant teacher-forced on them.
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write(json.dumps({"prompt_token_ids": prompt_ids, "images": [IMAGE], "max_tokens": STEPS}) + "\n")
        path = f.name
    ref = json.loads(mmreg(["generate", "--model", ckpt, "--requests", path, "--device", "cuda", "--dtype", "bf16",
                            "--max-model-len", "4096", "--max-tokens", str(STEPS), "--top-logprobs", "5"]).strip())
    if "token_ids" not in ref:
        raise RuntimeError(f"TP=1 reference: {ref}")
    # The reference may stop at its EOS before STEPS tokens: the steps compared are its tokens.
    ref_tokens, ref_top5 = ref["token_ids"], ref["top_tokens"]
    results = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "shapes": SHAPES, "prompt_tokens": len(prompt_ids),
               "variants": {}}
    for name, tp, env, extra in variants:
        picks, top5 = top5_steps(ckpt, tp, prompt_ids, ref_tokens, env, extra)
        steps = [a == b or (a in h5 and b in o5) for a, b, h5, o5 in zip(picks, ref_tokens, ref_top5, top5)]
        bench = json.loads(mmreg(["bench", "--model", ckpt, "--image", IMAGE, "--prompt", PROMPT, "--batch", "1,8,32",
                                  "--max-tokens", "128", "--device", "cuda", "--dtype", "bf16",
                                  "--tensor-parallel-size", str(tp), *extra], env).strip().splitlines()[-1])
        results["variants"][name] = {"tp": tp, "env": env, "args": extra, "agree": sum(steps), "identical": sum(
            a == b for a, b in zip(picks, ref_tokens)), "per_step": steps, "bench": bench}
        print(f"{name}: top-5 rule {sum(steps)}/{len(steps)}, decode b1 {bench.get('decode_tok_per_s_bs1', 0):.1f} "
              f"b8 {bench.get('decode_tok_per_s_bs8', 0):.1f} b32 {bench.get('decode_tok_per_s_bs32', 0):.1f} tok/s",
              flush=True)
    print(f"## {results['gpu']} x{gpus}: {SHAPES} shapes, random bf16, prompt {len(prompt_ids)} tokens")
    print("| variant | top-5 steps | prefill b1 ms | prefill b8 ms | decode b1 | decode b8 | decode b32 |")
    print("|---|---|---|---|---|---|---|")
    for name, v in results["variants"].items():
        b = v["bench"]
        print(f"| {name} | {v['agree']}/{len(v['per_step'])} | {b.get('prefill_bs1_ms', 0):.1f} | {b.get('prefill_bs8_ms', 0):.1f} | "
              f"{b.get('decode_tok_per_s_bs1', 0):.1f} | {b.get('decode_tok_per_s_bs8', 0):.1f} | "
              f"{b.get('decode_tok_per_s_bs32', 0):.1f} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"tp-{SHAPES}.json"), "w") as f:
            json.dump(results, f, indent=1)
    shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    main()
