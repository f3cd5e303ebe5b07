"""The parity harness's models at real sizes: PaliGemma-3B-, Gemma-3-4B- and SmolVLM-2B-shaped random bf16
checkpoints on the GPU machine, HF transformers vs mmreg in one run (MODELS=paligemma,gemma3,smolvlm picks;
all by default):

1. bf16 agreement by vLLM's top-5 rule at every one of 32 greedy steps, teacher-forced on HF's tokens: HF
   generates 32 tokens; mmreg gets 32 requests, the prompt's ids as HF's processor made them (images
   expanded; mmreg keeps expanded ids as they are) plus HF's first k tokens, one new token each with its
   top-5. Step k passes when both pick the same token, or each side's pick is in the other's top-5.
2. Prefill (last-token logits, as `generate()` computes them) and greedy decode at batch 1 and 8, for HF
   (`generate()`, sdpa, dynamic cache) and `mmreg bench`.

The tokenizer and processor settings come from the tiny fixtures (fixtures/paligemma-tiny,
fixtures/gemma3-tiny: the real Gemma 3 tokenizer; PaliGemma's extended with <image>, <locNNNN>, <segNNN>;
fixtures/smolvlm-tiny: Llama-2's with the Idefics3 tags, its image sizes set to SmolVLM-Instruct's).
Usage on the GPU machine, from the repo root, after staging the mmreg binary:
    python3 scripts/gpu/parity_models.py gpu-stage/run.sh      (writes $OUT/<model>.json when OUT is set)
"""
import gzip, json, os, shutil, subprocess, sys, tempfile, time

import torch
from PIL import Image
from transformers import (AutoProcessor, Gemma3Config, Gemma3ForConditionalGeneration, PaliGemmaConfig,
                          PaliGemmaForConditionalGeneration, SmolVLMConfig, SmolVLMForConditionalGeneration)

RUN = sys.argv[1] if len(sys.argv) > 1 else "gpu-stage/run.sh"
MODELS = os.environ.get("MODELS", "paligemma,gemma3,gemma3_long,smolvlm").split(",")
IMAGE = "fixtures/images/next_480x640.png"
STEPS = 32
DECODE = 64

# ~3000 Gemma tokens of plain text (a paragraph repeated with its number, so no two are alike).
LONG_TEXT = " ".join(f"Paragraph {i}: the harbour was quiet that morning, and the boats rocked slowly while "
                     f"gulls circled over the nets that the fishermen had left to dry on the stones."
                     for i in range(100))

SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)


def paligemma_config(tok_len):
    # paligemma-3b-mix-224: SigLIP So400m at 224 px, Gemma-2B. The vocabulary covers the fixture's
    # tokenizer (<image> = 262145, <loc>/<seg> up to 263297) instead of the released 257216 rows.
    vocab = tok_len
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=224, projection_dim=2048, **SIGLIP_SO400M),
        text_config=dict(model_type="gemma", vocab_size=vocab, hidden_size=2048, intermediate_size=16384,
                         num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                         hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192, rope_theta=10000.0),
        image_token_index=262145, vocab_size=vocab, projection_dim=2048, hidden_size=2048)
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    return PaliGemmaForConditionalGeneration, config


def gemma3_config(tok_len):
    # gemma-3-4b-it.
    text = dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, query_pre_attn_scalar=256,
                sliding_window=1024, rms_norm_eps=1e-6,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    config = Gemma3Config(text_config=text,
                          vision_config=dict(model_type="siglip_vision_model", image_size=896, **SIGLIP_SO400M),
                          mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000,
                          image_token_index=262144)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    return Gemma3ForConditionalGeneration, config


def smolvlm_processor(ckpt):
    # SmolVLMProcessor needs num2words, which the GPU machine cannot install; Idefics3Processor writes the same
    # prompt (scripts/parity.py checks that) and takes SmolVLM's image processor.
    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    images = SmolVLMImageProcessorPil(size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}, resample=1,
                                      do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True,
                                      do_image_splitting=True, do_pad=True)
    return Idefics3Processor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(ckpt), image_seq_len=81)


def smolvlm_config(tok_len):
    # HuggingFaceTB/SmolVLM-Instruct: SigLIP So400m at 384 px, scale factor 3 (81 tokens a tile), SmolLM2-1.7B.
    config = SmolVLMConfig(
        vision_config=dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=27, num_attention_heads=16, hidden_act="gelu_pytorch_tanh"),
        text_config=dict(model_type="llama", vocab_size=tok_len, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         rms_norm_eps=1e-5, max_position_embeddings=16384, rope_theta=273768.0,
                         tie_word_embeddings=True),
        scale_factor=3, image_token_id=32000, tie_word_embeddings=True, pad_token_id=0)
    config.architectures = ["SmolVLMForConditionalGeneration"]
    return SmolVLMForConditionalGeneration, config


MODELS_SPEC = {
    "paligemma": dict(name="PaliGemma-3B", fixture="fixtures/paligemma-tiny", config=paligemma_config,
                      prompt="<image>answer en What is shown in this picture?"),
    "gemma3": dict(name="Gemma-3-4B", fixture="fixtures/gemma3-tiny", config=gemma3_config,
                   prompt="<bos><start_of_turn>user\n<start_of_image>Describe this image in detail.<end_of_turn>\n"
                          "<start_of_turn>model\n"),
    # Past the 1024-token sliding window: one image and ~3k tokens of text, so the sliding layers' pool
    # frees blocks as the window passes them (mmreg) while HF masks them.
    "gemma3_long": dict(name="Gemma-3-4B, 3.3k-token prompt", fixture="fixtures/gemma3-tiny", config=gemma3_config,
                        prompt="<bos><start_of_turn>user\n<start_of_image>" + LONG_TEXT +
                               " Describe this image in detail.<end_of_turn>\n<start_of_turn>model\n"),
    "smolvlm": dict(name="SmolVLM-2B", fixture="fixtures/smolvlm-tiny", config=smolvlm_config,
                    prompt="User:<image>Describe this image.<end_of_utterance>\nAssistant:",
                    processor={"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}},
                    processor_top={"image_seq_len": 81}, build_processor=smolvlm_processor),
}


def copy_processor(fixture, ckpt):
    for f in os.listdir(fixture):
        if f.endswith(".json") and f not in ("config.json", "parity.json", "generation_config.json") \
                or f.endswith(".jinja"):
            shutil.copy(os.path.join(fixture, f), ckpt)
    packed = os.path.join(fixture, "tokenizer.json.gz")
    if os.path.exists(packed):
        with gzip.open(packed) as src, open(f"{ckpt}/tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copy(os.path.join(fixture, "tokenizer.json"), ckpt)


def make_checkpoint(spec, ckpt):
    os.makedirs(ckpt, exist_ok=True)
    copy_processor(spec["fixture"], ckpt)
    if spec.get("processor") or spec.get("processor_top"):
        path = f"{ckpt}/processor_config.json"
        with open(path) as f:
            settings = json.load(f)
        settings["image_processor"].update(spec.get("processor", {}))
        settings.update(spec.get("processor_top", {}))
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)
    proc = spec.get("build_processor", AutoProcessor.from_pretrained)(ckpt)
    model_class, config = spec["config"](len(proc.tokenizer))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_class._from_config(config, dtype=torch.bfloat16)
    model.eval()
    t = time.time()
    model.save_pretrained(ckpt)
    print(f"{spec['name']}: checkpoint saved in {time.time() - t:.1f}s", flush=True)
    return model, proc


def hf_inputs(proc, prompt, batch):
    image = Image.open(IMAGE).convert("RGB")
    inputs = proc(images=[[image]] * batch, text=[prompt] * batch, return_tensors="pt").to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return inputs


def timed(f, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize(); t = time.time()
        f()
        torch.cuda.synchronize(); best = min(best, time.time() - t)
    return best


def hf_bench(model, proc, prompt):
    out = {}
    for batch in (1, 8):
        inputs = hf_inputs(proc, prompt, batch)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
            prefill = timed(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False, eos_token_id=None))
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
        raise RuntimeError(f"mmreg {args[0]} failed with {out.returncode}")
    return out.stdout


def config_of(ckpt):
    with open(f"{ckpt}/config.json") as f:
        config = json.load(f)
    return config.get("text_config", config)


def kv_capacity(text, bench):
    """Tokens the KV cache holds as mmreg split it, and as one pool of every layer would."""
    if "kv_blocks" not in bench:
        return None
    block = bench["block_size"]
    per_layer_token = 2 * text["num_key_value_heads"] * text.get("head_dim", 0) * 2  # bf16
    layers = text["num_hidden_layers"]
    return {"kv_cache_gib": bench["kv_cache_bytes"] / 2**30, "tokens": bench["kv_blocks"] * block,
            "sliding_tokens": bench["sliding_blocks"] * block,
            "shared_tokens": bench["kv_cache_bytes"] // (layers * per_layer_token) if per_layer_token else None}


def run(key):
    spec = MODELS_SPEC[key]
    ckpt = f"/tmp/{key}-random"
    model, proc = make_checkpoint(spec, ckpt)
    inputs = hf_inputs(proc, spec["prompt"], 1)
    prompt_ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
    hf_tokens = out.sequences[0, len(prompt_ids):].tolist()
    hf_top5 = [s[0].float().topk(5).indices.tolist() for s in out.scores]
    hf = hf_bench(model, proc, spec["prompt"])
    del model
    torch.cuda.empty_cache()

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for k in range(STEPS):
            f.write(json.dumps({"prompt_token_ids": prompt_ids + hf_tokens[:k], "images": [IMAGE],
                                "max_tokens": 1}) + "\n")
        path = f.name
    lines = mmreg(["generate", "--model", ckpt, "--requests", path, "--top-logprobs", "5", "--device", "cuda",
                   "--dtype", "bf16", "--max-model-len", "4096", "--max-tokens", "1"]).strip().splitlines()
    results = [json.loads(l) for l in lines]
    ours = [r["token_ids"][0] for r in results]
    ours_top5 = [r["top_tokens"][0] for r in results]
    steps = [a == b or (a in h5 and b in o5) for a, b, h5, o5 in zip(ours, hf_tokens, hf_top5, ours_top5)]
    agree = sum(steps)
    print(f"{spec['name']}: top-5 rule, teacher-forced: {agree}/{STEPS} steps pass; identical picks "
          f"{sum(a == b for a, b in zip(ours, hf_tokens))}/{STEPS}", flush=True)

    bench = json.loads(mmreg(["bench", "--model", ckpt, "--image", IMAGE, "--prompt", spec["prompt"], "--batch",
                              "1,8", "--max-tokens", str(DECODE), "--device", "cuda", "--dtype", "bf16"])
                       .strip().splitlines()[-1])
    print(f"## {torch.cuda.get_device_name(0)}: {spec['name']} shapes, random bf16, prompt {len(prompt_ids)} tokens "
          f"(one 480x640 image)")
    print("| metric | mmreg | HF transformers (generate, sdpa) |")
    for k in ["prefill_bs1_ms", "prefill_bs8_ms", "decode_tok_per_s_bs1", "decode_tok_per_s_bs8"]:
        print(f"| {k} | {bench.get(k, float('nan')):.1f} | {hf[k]:.1f} |")
    print(f"| top-5 agreement, steps | {agree}/{STEPS} | |", flush=True)
    kv = kv_capacity(config_of(ckpt), bench)
    if kv:
        print(f"KV cache {kv['kv_cache_gib']:.1f} GiB: the global layers hold {kv['tokens']} tokens, the sliding "
              f"pool {kv['sliding_tokens']}; one pool of every layer would hold {kv['shared_tokens']}", flush=True)
    result = {"gpu": torch.cuda.get_device_name(0), "model": spec["name"], "prompt_tokens": len(prompt_ids),
              "hf": hf, "mmreg": bench, "kv_capacity": kv,
              "agreement": {"steps": STEPS, "pass": agree, "per_step": steps, "hf_tokens": hf_tokens,
                            "mmreg_tokens": ours, "hf_top5": hf_top5, "mmreg_top5": ours_top5}}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"{key}.json"), "w") as f:
            json.dump(result, f, indent=1)
    shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    for key in MODELS:
        try:
            run(key)
        except Exception as e:  # one model's failure still leaves the other's figures
            print(f"{key}: FAILED: {e!r}", flush=True)
