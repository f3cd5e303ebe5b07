"""What the GPU scripts share: the staged runner, the inputs, how mmreg, HF transformers and the
compiled-PyTorch anchor are run and labelled, vLLM's top-5 agreement rule, the bandwidth floor, and the
run's JSON record (written to $OUT, to be committed under docs/bench-runs/)."""
import ast, json, os, signal, subprocess, sys, tempfile, time
from collections import namedtuple

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor

import checkpoints

RUN = sys.argv[1] if len(sys.argv) > 1 else "gpu-stage/run.sh"
GEN = 128  # tokens generated per request in the decode measurement
STEPS = 32  # greedy steps compared with HF
LLAVA, NEXT = "/tmp/llava-1.5-7b", "/tmp/llava-next-mistral-7b"
TRACES = os.environ.get("TRACES", "/tmp/mmreg-traces")  # Kineto traces of mmreg (scripts/gpu/trace_summary.py)
IMAGE15 = "fixtures/llava-tiny-real/images/b_480x640.png"
IMAGE_NEXT = "fixtures/llava-next-tiny-real/images/landscape_480x640.png"
PROMPT15 = "USER: <image>\nWhat is shown in this image? Describe every detail of it, please. ASSISTANT:"
PROMPT_NEXT = "[INST] <image>\nWhat is shown in this image? [/INST]"
IMAGE_TOKEN = 32000  # `<image>` in both LLaVA checkpoints
Shape = namedtuple("Shape", "name make path image prompt batches")
SHAPES = [Shape("LLaVA-1.5-7B", checkpoints.llava15, LLAVA, IMAGE15, PROMPT15, "1,8,32"),
          Shape("LLaVA-NeXT-Mistral-7B", checkpoints.llava_next_mistral, NEXT, IMAGE_NEXT, PROMPT_NEXT, "1,8")]
# gpt-fast's recipe on a Llama-2-7B-shaped decoder (LLaVA-1.5-7B's), staged by scripts/gpu-stage.sh from
# ../shared/bench/ (not our code, so not in the repo).
ANCHOR = "gpu-stage/peers/compiled_llama_anchor.py"
ANCHOR_TIMEOUT = int(os.environ.get("ANCHOR_TIMEOUT", "420"))  # seconds; it compiles once per batch size


# What each peer measured, in every table and in the JSON.
def hf_label():
    return f"HF transformers {transformers.__version__} eager generate(), dynamic cache, sdpa"


def anchor_label(mode):
    return (f"compiled PyTorch {torch.__version__} (gpt-fast recipe: static cache, fused qkv/gate-up, SDPA, "
            f"torch.compile reduce-overhead), mode: {mode}")


def mmreg_label(eager=False, fused=False, binary="mmreg"):
    return (f"{binary} (CUDA graphs {'off' if eager else 'on'}, "
            f"MMREG_FUSED_KERNELS {'on' if fused else 'off'})")


def record(kind):
    """The head of a run's JSON: what ran where."""
    return {"kind": kind, "date": time.strftime("%Y-%m-%d %H:%M"), "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__, "transformers": transformers.__version__, "commit": commit(),
            "models": {}}


def commit():
    """MMREG_COMMIT, else the commit gpu-stage.sh staged from, else git's (None outside a checkout)."""
    if os.environ.get("MMREG_COMMIT"):
        return os.environ["MMREG_COMMIT"]
    if os.path.exists("gpu-stage/commit"):
        return open("gpu-stage/commit").read().strip()
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return git.stdout.strip() if git.returncode == 0 else None


def write_json(name, data):
    if not os.environ.get("OUT"):
        print(f"OUT is not set: {name} not written", flush=True)
        return
    with open(os.path.join(os.environ["OUT"], name), "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote $OUT/{name}", flush=True)


def _mmreg_stdout(args, eager=False, fused=False, binary="mmreg", env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    if eager:
        env["MMREG_NO_CUDA_GRAPHS"] = "1"
    env["MMREG_FUSED_KERNELS"] = "1" if fused else "0"  # on by default since run 26
    out = subprocess.run([RUN, binary, *args], capture_output=True, text=True, env=env)
    sys.stderr.write(out.stderr[-3000:])
    if out.returncode != 0:
        print(out.stdout[-3000:])
        sys.exit(f"mmreg {args[0]} failed with {out.returncode}")
    return out.stdout


def mmreg(args, eager=False, fused=False, binary="mmreg", env_extra=None):
    """Runs the staged `mmreg` (or another staged binary, such as `mmreg-before`) and returns the JSON
    object of its last line. eager: without CUDA graphs; fused: with the fused kernels; env_extra: more
    environment (such as MMREG_FUSED_LINEAR=0)."""
    return json.loads(_mmreg_stdout(args, eager, fused, binary, env_extra).strip().splitlines()[-1])


def mmreg_bench(model, prompt, image, batches, eager=False, fused=False, binary="mmreg", trace=None, gen=GEN,
                env_extra=None):
    """`mmreg bench` (bf16, `gen` new tokens) as a peer of the record: label, switches and result. An `ARGS`
    entry of `env_extra` is not set in the environment: its words are more flags of `mmreg bench`."""
    args = ["bench", "--model", model, "--prompt", prompt, "--image", image, "--batch", batches,
            "--max-tokens", str(gen), "--device", "cuda", "--dtype", "bf16"] + (["--trace", trace] if trace else [])
    env = dict(env_extra or {})
    args += env.pop("ARGS", "").split()
    result = mmreg(args, eager, fused, binary, env or None)
    label = mmreg_label(eager, fused, binary) + "".join(f", {k}={v}" for k, v in (env_extra or {}).items())
    print(label, result, flush=True)
    return {"peer": "mmreg", "label": label, "switches": {"cuda_graphs": not eager, "fused_kernels": fused,
                                                          **(env_extra or {})},
            "binary": binary, "result": result}


def anchor(prompt_tokens, batches="1,8,32", device_pos=False):
    """The compiled-PyTorch decode anchor as a peer, or None (absent, failed or out of time: a printed note).
    With device_pos, the same anchor with its decode position kept on the device, as gpt-fast's loop keeps
    it (scripts/gpu/anchor_device_pos.py): the stock anchor's host waits for the GPU every token."""
    if not os.path.exists(ANCHOR):
        print(f"note: {ANCHOR} is absent (scripts/gpu-stage.sh copies it from ../shared/bench/): anchor skipped")
        return None
    script = "scripts/gpu/anchor_device_pos.py" if device_pos else ANCHOR
    cmd = [sys.executable, script, str(prompt_tokens), str(GEN), batches]
    print("running", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group, so that a timeout ends its compile workers
    # ANCHOR_DEADLINE (seconds since the epoch), where set, shortens the limit to what a device call has left.
    timeout = ANCHOR_TIMEOUT
    if os.environ.get("ANCHOR_DEADLINE"):
        timeout = max(1, min(timeout, int(os.environ["ANCHOR_DEADLINE"]) - int(time.time())))
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        print(out[-2000:], f"\nnote: the anchor ran past {timeout} s (ANCHOR_TIMEOUT, ANCHOR_DEADLINE)", flush=True)
        # It prints its results so far after each batch size: keep those, marked partial.
        done = [line for line in out.splitlines() if line.startswith("{'") and "'mode'" in line]
        if not done:
            return None
        result = ast.literal_eval(done[-1])
        result["partial"] = True
    else:
        print(out[-2000:], flush=True)
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            print(f"note: the anchor failed (exit {proc.returncode}, no JSON line): skipped", flush=True)
            return None
    result["prompt_tokens"] = result.pop("prompt", prompt_tokens)
    result.pop("gen", None)  # GEN
    if device_pos:
        return {"peer": "anchor-device-pos", "result": result,
                "label": anchor_label(result.get("mode")) + ", decode position on the device (gpt-fast's loop)"}
    return {"peer": "anchor", "label": anchor_label(result.get("mode")), "result": result}


def hf_inputs(model, shape):
    """The processor's inputs for the shape's image and prompt (pixels in bf16), the prompt's ids as mmreg
    takes them (one <image> per image: mmreg expands it itself, as vLLM's prompt_token_ids), and HF's
    expanded ids, checked to be the same but for the expansion."""
    processor = AutoProcessor.from_pretrained(shape.path, backend="pil")
    inputs = processor(images=Image.open(shape.image), text=shape.prompt, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    prompt_ids = processor.tokenizer(shape.prompt).input_ids
    expanded = inputs["input_ids"][0].tolist()
    assert prompt_ids.count(IMAGE_TOKEN) == 1 and \
        [t for t in expanded if t != IMAGE_TOKEN] == [t for t in prompt_ids if t != IMAGE_TOKEN], \
        "the tokenizer's prompt ids are not the processor's without the expansion"
    return inputs, prompt_ids, expanded


def repeat(inputs, b):
    return {k: v.repeat(b, *[1] * (v.dim() - 1)) for k, v in inputs.items()}


def hf_bench(model, inputs_for, batches, gen=GEN):
    """HF transformers as a peer: prefill as generate() computes it (the first forward, last-token logits
    only), and decode tokens/s of generate() after it. inputs_for(b): the processor's inputs for batch b."""
    res = {}
    sync = torch.cuda.synchronize
    with torch.inference_mode():
        for b in batches:
            batch = inputs_for(b)
            for _ in range(3):
                model(**batch, logits_to_keep=1)
            sync(); t = time.perf_counter()
            for _ in range(5):
                model(**batch, logits_to_keep=1)
            sync(); prefill = (time.perf_counter() - t) / 5
            res[f"prefill_bs{b}_ms"] = prefill * 1000
            model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            sync(); t = time.perf_counter()
            model.generate(**batch, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
            sync(); res[f"decode_tok_per_s_bs{b}"] = b * (gen - 1) / (time.perf_counter() - t - prefill)
            print(hf_label(), res, flush=True)
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return {"peer": "hf", "label": hf_label(), "result": res}


def hf_greedy(model, inputs, steps=STEPS):
    """HF's greedy tokens and each step's top-5 ids (bf16), for vLLM's top-5 rule."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(tokens) == steps, f"HF stopped after {len(tokens)} of {steps} tokens"
    return tokens, [s[0].float().topk(5).indices.tolist() for s in out.scores]


def agreement(ckpt, image, prompt_ids, hf_tokens, hf_top5, fused=False):
    """vLLM's top-5 rule at every step, teacher-forced on HF's tokens. mmreg gets one request per step k:
    the prompt's ids (one placeholder per image, as vLLM's prompt_token_ids) plus HF's first k tokens, one
    new token with its top 5. Step k passes when both pick the same token, or each pick is in the other's
    top 5. HF's step k is conditioned on its own first k tokens, so a difference does not carry over."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for k in range(len(hf_tokens)):
            f.write(json.dumps({"prompt_token_ids": prompt_ids + hf_tokens[:k], "images": [image],
                                "max_tokens": 1, "ignore_eos": True}) + "\n")
    out = _mmreg_stdout(["generate", "--model", ckpt, "--requests", f.name, "--top-logprobs", "5", "--device",
                         "cuda", "--dtype", "bf16", "--max-model-len", "4096", "--max-tokens", "1"], fused=fused)
    os.unlink(f.name)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    label = mmreg_label(fused=fused)
    errors = [r["error"] for r in results if "error" in r]
    if errors or len(results) != len(hf_tokens):
        print(f"{label}: agreement not measured: {len(results)} answers, errors {errors[:2]}", flush=True)
        return {"label": label, "error": errors[:2] or f"{len(results)} answers to {len(hf_tokens)} requests"}
    ours = [r["token_ids"][0] for r in results]
    ours_top5 = [r["top_tokens"][0] for r in results]
    per_step = [a == b or (a in b_top and b in a_top)
                for a, a_top, b, b_top in zip(ours, ours_top5, hf_tokens, hf_top5)]
    res = {"label": label, "switches": {"cuda_graphs": True, "fused_kernels": fused}, "rule": "vLLM top-5",
           "steps": len(per_step), "pass": sum(per_step), "identical": sum(a == b for a, b in zip(ours, hf_tokens)),
           "per_step": per_step, "mmreg_prompt_tokens": results[0].get("prompt_tokens"), "hf_tokens": hf_tokens,
           "mmreg_tokens": ours, "hf_top5": hf_top5, "mmreg_top5": ours_top5}
    print(f"{label}: vLLM top-5 rule, teacher-forced: {res['pass']}/{res['steps']} steps pass, identical picks "
          f"{res['identical']}/{res['steps']}", flush=True)
    return res


def floor(model):
    """The batch-1 decode floor: the decoder's and LM head's weights (what a decode step reads) read once, at
    the read bandwidth measured here (sum over a 4 GiB bf16 tensor); and the KV cache's bytes a position, for
    the floor at larger batches (scripts/floor_shares.py)."""
    weights = sum(p.numel() * p.element_size()
                  for part in (model.model.language_model, model.lm_head) for p in part.parameters())
    x = torch.ones(2**31, dtype=torch.bfloat16, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        x.sum()
    start.record()
    for _ in range(20):
        x.sum()
    end.record()
    torch.cuda.synchronize()
    bandwidth = 20 * x.numel() * x.element_size() / (start.elapsed_time(end) / 1000)
    del x
    # Keys and values a position (what attention reads per sequence besides the weights): the floor at
    # batch b and context c is b x bandwidth / (weights + b x c x this), scripts/floor_shares.py.
    text = model.config.text_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    element = next(model.lm_head.parameters()).element_size()
    res = {"bandwidth_bytes_per_s": bandwidth, "decode_weight_bytes": weights,
           "kv_bytes_per_token": text.num_hidden_layers * 2 * kv_heads * head_dim * element,
           "decode_tok_per_s_bs1": bandwidth / weights,
           "what": "decoder + LM head weights read once per token at the read bandwidth of a 4 GiB sum"}
    print("floor", res, flush=True)
    return res


# Rows in this order first, then any other figure a peer reports, by name.
KEYS = ["prompt_tokens", "prefill_bs1_ms", "prefill_bs1_median_ms", "prefill_embed_bs1_ms", "prefill_bs8_ms",
        "prefill_bs8_median_ms", "prefill_embed_bs8_ms", "prefill_bs32_ms", "prefill_bs32_median_ms", "ttft_bs1_ms", "ttft_last_bs1_ms", "ttft_bs8_ms", "ttft_last_bs8_ms", "ttft_bs32_ms",
        "ttft_last_bs32_ms", "decode_tok_per_s_bs1", "decode_tok_per_s_bs8", "decode_tok_per_s_bs32",
        "peak_mem_gib", "load_s", "tuned_gemm_shapes_timed", "tuned_gemm_tuning_s"]


def print_table(title, peers):
    print(f"\n## {title}\n| metric | " + " | ".join(p["label"] for p in peers) + " |\n" + "|---" * (len(peers) + 1)
          + "|")
    figures = {k for p in peers for k, v in p["result"].items() if isinstance(v, (int, float))}
    for key in sorted(figures, key=lambda k: (KEYS.index(k) if k in KEYS else len(KEYS), k)):
        cells = [p["result"].get(key) for p in peers]
        print(f"| {key} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
    print(flush=True)
