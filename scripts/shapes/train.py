#!/usr/bin/env python3
"""Train mmreg's embedded demo model: a tiny LLaVA that describes synthetic shapes (see docs/demo-model.md).

From scratch, on CPU, one thread, deterministic (fixed seeds). Writes ``assets/shapes-llava/``:
config.json, generation_config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json,
preprocessor_config.json, processor_config.json, train_log.json (recipe, timings, losses, accuracies),
samples/ (a few PNGs + captions.json).

* Data: scripts/shapes/data.py (train split seed 1, val split seed 3 for monitoring; the held-out split, seed 2,
  is only touched by eval_hf.py).
* Tokenizer: word level (``tokenizers`` WordLevel over the caption words + "describe" + ":"), Whitespace
  pre-tokenizer, specials <pad>=0 <s>=1 </s>=2 <unk>=3 <image>=4, TemplateProcessing "<s> $A", no decoder (so
  decode joins tokens with single spaces; skip_special_tokens drops <s>/</s>/<pad>/<image>).
* Pixel values: HF's own ``LlavaProcessor`` loaded with ``AutoProcessor.from_pretrained(out, backend="pil")``
  from the files this script writes, i.e. exactly what inference loads (CLIPImageProcessorPil, shortest edge 64,
  bicubic, center crop 64, CLIP mean/std).
* Sequence: processor(text=PROMPT + " " + caption) -> <s> <image>*64 describe : caption..., then </s> appended;
  the loss is on the caption tokens and </s> only.

Run (from the repo root):
    ~/.cache/mmreg/pydev/bin/python scripts/shapes/train.py            # full recipe, writes assets/shapes-llava
    ~/.cache/mmreg/pydev/bin/python scripts/shapes/train.py --bench    # time a few steps and exit
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "assets" / "shapes-llava"

PROMPT = "<image> describe:"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)
PROMPT_WORDS = ["describe", ":"]
MAX_NEW_TOKENS = 24

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

RECIPE = {
    # data
    "train_images": 24000,  # train split indices 0..N-1 (seed 1), preprocessed once
    "val_images": 200,  # val split (seed 3), greedy exact match every eval_every steps
    # model
    "image_size": 64,
    "patch_size": 8,
    "vision_hidden": 96,
    "vision_intermediate": 384,
    "vision_layers": 4,  # layer -2 is used, so the last one is never trained (as in LLaVA-1.5)
    "vision_heads": 4,
    "text_hidden": 128,
    "text_intermediate": 256,
    "text_layers": 3,
    "text_heads": 4,
    "text_kv_heads": 2,
    "rope_theta": 10000.0,
    # optimisation
    "seed": 0,
    "steps": 3000,
    "batch_size": 48,
    "lr": 1e-3,  # 2e-3 / 3e-3 learn the shape words 2-3x slower (the vision tower is the bottleneck)
    "warmup_steps": 100,
    "min_lr_ratio": 0.05,  # cosine decay from lr to lr * min_lr_ratio
    "weight_decay": 0.01,
    "betas": [0.9, 0.98],
    "grad_clip": 1.0,
    "eval_every": 500,
}


# ------------------------------------------------------------------------------------------------------------------
# files of the checkpoint directory
# ------------------------------------------------------------------------------------------------------------------


def build_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + data.caption_words() + PROMPT_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)])
    return tok


def preprocessor_config(size: int) -> dict:
    # Same keys as llava-hf/llava-1.5-7b-hf's preprocessor_config.json, at this model's size.
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size},
    }


def build_config(r: dict, vocab_size: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=r["image_size"], patch_size=r["patch_size"], hidden_size=r["vision_hidden"],
        intermediate_size=r["vision_intermediate"], num_hidden_layers=r["vision_layers"],
        num_attention_heads=r["vision_heads"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=r["vision_hidden"])
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=r["text_hidden"], intermediate_size=r["text_intermediate"],
        num_hidden_layers=r["text_layers"], num_attention_heads=r["text_heads"],
        num_key_value_heads=r["text_kv_heads"], hidden_act="silu", rms_norm_eps=1e-5,
        max_position_embeddings=256, rope_theta=r["rope_theta"], tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    n_img = (r["image_size"] // r["patch_size"]) ** 2
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_ID, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=n_img,
        tie_word_embeddings=False)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    return cfg


def write_processor_files(out: Path, r: dict, cfg: LlavaConfig):
    """tokenizer + processor files + config.json, so that AutoProcessor.from_pretrained(out) is the real thing."""
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>", clean_up_tokenization_spaces=False, model_max_length=512)
    hf_tok.save_pretrained(str(out))
    dump_json(out / "preprocessor_config.json", preprocessor_config(r["image_size"]))
    dump_json(out / "processor_config.json", {
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": r["patch_size"],
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"})
    cfg.save_pretrained(str(out))


def load_processor(out: Path, r: dict):
    proc = AutoProcessor.from_pretrained(str(out), backend="pil")
    ip = proc.image_processor
    assert type(ip) is CLIPImageProcessorPil, type(ip)
    assert ip.size == {"shortest_edge": r["image_size"]} or ip.size.get("shortest_edge") == r["image_size"], ip.size
    assert ip.resample == 3 and ip.do_center_crop and ip.do_convert_rgb, (ip.resample, ip.do_center_crop)
    assert proc.patch_size == r["patch_size"] and proc.num_additional_image_tokens == 1
    # HF's tokenizer must agree with tokenizer.json as the Rust `tokenizers` crate reads it.
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    probe = PROMPT + " a red circle at the top left and an orange star in the center"
    assert proc.tokenizer(probe).input_ids == raw.encode(probe).ids, (proc.tokenizer(probe).input_ids,
                                                                     raw.encode(probe).ids)
    assert raw.encode(PROMPT).ids == [BOS_ID, IMAGE_ID, raw.token_to_id("describe"), raw.token_to_id(":")]
    return proc


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def dump_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------------
# data -> tensors
# ------------------------------------------------------------------------------------------------------------------


def encode_split(proc, name: str, n: int, chunk: int = 500):
    """pixel_values [n,3,S,S] f32, input_ids [n,L] (right-padded with <pad>, </s> appended), labels, mask, captions."""
    pix, seqs, n_prompt, caps = [], [], None, []
    for start in range(0, n, chunk):
        items = list(data.split(name, min(chunk, n - start), start))
        imgs = [img for _, img, _ in items]
        texts = [PROMPT + " " + cap for _, _, cap in items]
        enc = proc(images=imgs, text=texts, return_tensors=None, padding=False)
        pix.append(torch.tensor(np.asarray(enc["pixel_values"]), dtype=torch.float32))
        for ids in enc["input_ids"]:
            seqs.append(list(ids) + [EOS_ID])
        if n_prompt is None:
            n_prompt = len(proc(images=imgs[:1], text=[PROMPT], return_tensors=None)["input_ids"][0])
        caps += [cap for _, _, cap in items]
    L = max(len(s) for s in seqs)
    ids = torch.full((n, L), PAD_ID, dtype=torch.long)
    labels = torch.full((n, L), -100, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, n_prompt:len(s)] = torch.tensor(s[n_prompt:])
    return torch.cat(pix), ids, labels, mask, caps, n_prompt


def prompt_ids(proc) -> torch.Tensor:
    """The (image-expanded) prompt ids, identical for every image: [1, n_prompt]."""
    img = data.make_sample(data.SPLIT_SEEDS["val"], 0)[0]
    return torch.tensor([proc(images=[img], text=[PROMPT], return_tensors=None)["input_ids"][0]])


@torch.no_grad()
def greedy_batch(model, proc, pix: torch.Tensor, batch: int = 100) -> list[list[int]]:
    """HF generate (greedy, stop at </s>, MAX_NEW_TOKENS) for each image; the prompt is the same for all, so a
    batch needs no padding. Returns the new token ids of each image, cut after the first </s> (kept)."""
    model.eval()
    p = prompt_ids(proc)
    outs = []
    for s in range(0, pix.shape[0], batch):
        pv = pix[s:s + batch]
        ids = p.expand(pv.shape[0], -1)
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, do_sample=False,
                           max_new_tokens=MAX_NEW_TOKENS, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        for row in g[:, p.shape[1]:].tolist():
            outs.append(row[:row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return outs


def decode(proc, ids: list[int]) -> str:
    return proc.tokenizer.decode(ids, skip_special_tokens=True)


def accuracy(model, proc, pix, caps) -> tuple[float, list[str]]:
    gens = [decode(proc, g) for g in greedy_batch(model, proc, pix)]
    return sum(g == c for g, c in zip(gens, caps)) / len(caps), gens


# ------------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------------


def lr_at(step: int, r: dict) -> float:
    if step < r["warmup_steps"]:
        return r["lr"] * (step + 1) / r["warmup_steps"]
    t = (step - r["warmup_steps"]) / max(1, r["steps"] - r["warmup_steps"])
    lo = r["lr"] * r["min_lr_ratio"]
    return lo + 0.5 * (r["lr"] - lo) * (1 + math.cos(math.pi * t))


def make_model(cfg: LlavaConfig, seed: int):
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.config._attn_implementation = "sdpa"
    return model.to(torch.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--bench", action="store_true", help="time 10 training steps on 480 images and exit")
    ap.add_argument("--samples-only", action="store_true", help="only (re)write <out>/samples/ and exit")
    ap.add_argument("--set", nargs="*", default=[], help="override recipe entries, KEY=VALUE (experiments)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    r = dict(RECIPE)
    for kv in a.set:
        k, v = kv.split("=", 1)
        r[k] = type(RECIPE[k])(v) if not isinstance(RECIPE[k], list) else json.loads(v)
    out = Path(a.out)
    if a.samples_only:
        write_samples(out)
        return
    if a.bench:
        r.update(train_images=480, steps=10, val_images=0)
        out = Path("/tmp/shapes-llava-bench")
    t_all = time.time()
    print("recipe:", json.dumps(r), flush=True)

    vocab_size = build_tokenizer().get_vocab_size(with_added_tokens=True)
    cfg = build_config(r, vocab_size)
    if out.exists():
        shutil.rmtree(out)
    write_processor_files(out, r, cfg)
    proc = load_processor(out, r)

    t0 = time.time()
    pix, ids, labels, mask, caps, n_prompt = encode_split(proc, "train", r["train_images"])
    if r["val_images"]:
        vpix, _, _, _, vcaps, _ = encode_split(proc, "val", r["val_images"])
    t_data = time.time() - t0
    print(f"data: train {tuple(pix.shape)} ids {tuple(ids.shape)} prompt {n_prompt} tokens; {t_data:.1f}s",
          flush=True)

    model = make_model(cfg, r["seed"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=r["lr"], betas=tuple(r["betas"]), eps=1e-8)
    g = torch.Generator().manual_seed(r["seed"] + 1)
    perm, pos = torch.randperm(pix.shape[0], generator=g), 0
    log = {"steps": [], "evals": []}
    t_train0 = time.time()
    ema = None
    for step in range(r["steps"]):
        model.train()
        if pos + r["batch_size"] > perm.numel():
            perm, pos = torch.randperm(pix.shape[0], generator=g), 0
        idx = perm[pos:pos + r["batch_size"]]
        pos += r["batch_size"]
        L = int(mask[idx].sum(1).max())
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, r)
        loss = model(input_ids=ids[idx, :L], attention_mask=mask[idx, :L], pixel_values=pix[idx],
                     labels=labels[idx, :L]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % 50 == 0 or step == r["steps"] - 1:
            el = time.time() - t_train0
            print(f"step {step:5d} loss {lv:.4f} ema {ema:.4f} gnorm {float(gn):.3f} lr {lr_at(step, r):.2e} "
                  f"{el:.0f}s ({el / (step + 1):.3f}s/step)", flush=True)
            log["steps"].append({"step": step, "loss": round(lv, 5), "ema": round(ema, 5), "t": round(el, 1)})
        if r["val_images"] and ((step + 1) % r["eval_every"] == 0 or step == r["steps"] - 1):
            te = time.time()
            acc, gens = accuracy(model, proc, vpix, vcaps)
            bad = [(gg, c) for gg, c in zip(gens, vcaps) if gg != c][:3]
            print(f"  eval step {step + 1}: val exact match {acc:.3f} ({time.time() - te:.0f}s) {bad}", flush=True)
            log["evals"].append({"step": step + 1, "val_exact_match": acc})
            t_train0 += time.time() - te  # eval time is not training time
    t_train = time.time() - t_train0

    if a.bench:
        print(f"bench: {t_train / r['steps']:.3f}s/step at batch {r['batch_size']}")
        return

    # final loss: mean teacher-forced caption loss over the whole train set and over val, eval mode
    model.eval()
    with torch.no_grad():
        def mean_loss(p_, i_, l_, m_):
            tot, cnt = 0.0, 0
            for s in range(0, p_.shape[0], 200):
                lo = model(input_ids=i_[s:s + 200], attention_mask=m_[s:s + 200], pixel_values=p_[s:s + 200],
                           labels=l_[s:s + 200]).loss
                k = int((l_[s:s + 200, 1:] != -100).sum())
                tot, cnt = tot + lo.item() * k, cnt + k
            return tot / cnt
        final_train_loss = mean_loss(pix[:4000], ids[:4000], labels[:4000], mask[:4000])
    model.config._attn_implementation = "eager"
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(str(out))
    write_samples(out)
    info = {
        "recipe": r,
        "prompt": PROMPT,
        "params": n_params,
        "final_train_loss_per_token": round(final_train_loss, 6),
        "last_step_loss": log["steps"][-1]["loss"],
        "last_step_loss_ema": log["steps"][-1]["ema"],
        "data_prep_seconds": round(t_data, 1),
        "train_seconds": round(t_train, 1),
        "total_seconds": round(time.time() - t_all, 1),
        "machine": {"cpu": cpu_name(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "transformers": transformers.__version__,
                     "torch": torch.__version__, "tokenizers": tokenizers.__version__, "PIL": PIL.__version__,
                     "numpy": np.__version__},
        "log": log,
    }
    dump_json(out / "train_log.json", info)
    print(json.dumps({k: v for k, v in info.items() if k != "log"}, indent=1))


def pick_samples() -> list[tuple[int, "PIL.Image.Image", str]]:
    """Six held-out-seed images beyond the evaluated range (indices >= 10000): for each slot below, the first index
    that fills it, so sizes, aspect ratios, counts and positions (center included) vary."""
    seed = data.SPLIT_SEEDS["heldout"]
    slots = [("one", "land", False), ("one", "port", False), ("one", "square", True),
             ("two", "land", False), ("two", "port", True), ("two", "square", False)]
    found, i = {}, 10000
    while len(found) < len(slots):
        img, cap, _ = data.make_sample(seed, i)
        kind = "two" if " and " in cap else "one"
        w, h = img.size
        asp = "land" if w > 1.25 * h else "port" if h > 1.25 * w else "square"
        key = (kind, asp, "center" in cap)
        if key in slots and key not in found:
            found[key] = (i, img, cap)
        i += 1
    return [found[k] for k in slots]


def write_samples(out: Path):
    sd = out / "samples"
    if sd.exists():
        shutil.rmtree(sd)
    sd.mkdir(parents=True)
    caps = {}
    for i, img, cap in pick_samples():
        f = f"shapes_{i:05d}_{img.width}x{img.height}.png"
        img.save(sd / f, format="PNG", optimize=True)
        caps[f] = cap
    dump_json(sd / "captions.json", caps)


if __name__ == "__main__":
    main()
