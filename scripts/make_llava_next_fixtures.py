#!/usr/bin/env python3
"""Make tiny random LLaVA-NeXT checkpoints, HF-transformers goldens and a token-count table for the Rust tests.

Companion of ``scripts/make_llava_fixtures.py`` (LLaVA-1.5); same conventions, and it imports that script's
generic helpers (JSON writer, versions, synthetic image, key listing, golden writer). It needs the tokenizer
that script made in ``fixtures/tokenizer/``. What it writes (see fixtures/README.md):

* ``fixtures/llava-next-tiny-real/`` -- every code path of llava-hf/llava-v1.6-mistral-7b-hf at a tiny width:
  CLIP 336 px / patch 14 (576 base tokens), hidden 32, 3 layers, 4 heads, intermediate 37, quick_gelu,
  vision_feature_layer -2, strategy default, default anyres pinpoints, ``image_newline``; Mistral text model
  vocab 32064, hidden 32, 2 layers, 4 heads / 2 KV heads, intermediate 64, silu, rms eps 1e-5, rope_theta 1e6,
  sliding_window null. Weights rounded to bf16 and stored BF16 in ONE safetensors file with the LEGACY hub key
  layout (``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
  ``language_model.lm_head.weight``, ``image_newline``); hub-style config.json (non-default keys only),
  generation_config.json, preprocessor_config.json = llava-v1.6-mistral-7b-hf's (LlavaNextImageProcessor),
  processor_config.json, the tokenizer files, five synthetic PNGs in images/ and golden.*.
* ``fixtures/llava-next-tiny-hf/`` -- the config of HF's LlavaNextVisionText2TextModelTester (llama 99/32/2/4/37/
  gelu, max positions 580, pad 1; clip 8 px / patch 4; pinpoints [[16,16]]; image_token_index 0; layer -1),
  float32, written by ``save_pretrained`` of transformers 5.17 (its own key layout), goldens with token-id prompts
  and seeded uniform [0,1) pixel_values (B, 5, 3, 8, 8) given directly; cases one_image, two_images (image_sizes
  [[8,8]] each, 24 tokens per image) and unpad (image_sizes [[8,5],[3,8]] -> 16 and 14 tokens: both unpad branches).
* ``fixtures/llava-next-token-counts.json`` -- HF's number of ``<image>`` tokens (LlavaNextProcessor with the hub
  processor config) for every (h, w) pair of a list of sizes from 1 to 2000 (edge cases around multiples of
  14/168/336 included), the pinpoint chosen by ``select_best_resolution``, and the spec's worked examples.
tiny-real cases (prompt "[INST] <image>\nWhat is shown in this image? [/INST]"): portrait (500x316 h x w),
landscape (480x640), square (336x336), tiny (10x7), huge (1100x1900), and two_images = portrait + landscape in
"[INST] <image>\n<image>\nCompare them. [/INST]" (3 + 5 patches: the batch pads image 1 with 2 zero patches).

Weights: as make_llava_fixtures.py -- every parameter redrawn from one seeded generator (sorted by name):
matrices N(0, 1/fan_in), token embeddings N(0, 1), CLIP position/class embeddings N(0, 0.5^2), norm weights
1 + N(0, 0.1^2), biases N(0, 0.1^2), and ``image_newline`` N(0, 1) (like a token embedding).

Goldens (``golden.safetensors`` + ``golden.json``), HF eager attention, float32, CPU, 1 thread. tiny-real runs
the images through ``AutoProcessor.from_pretrained(dir, backend="pil")`` (LlavaNextImageProcessorPil +
TokenizersBackend). NeXT pixel_values are up to 5 x 3 x 336 x 336 f32 per image, so tiny-real does NOT store
them: golden.json has their shape and the sha256 of their float32 little-endian bytes (whole batch, each image
processed alone, and each patch). Tensors per case:
  {case}.input_ids [1,L] i64 (after HF's <image> expansion), {case}.image_sizes [B,2] i64 ((H, W) per image),
  {case}.logit_positions [P] i64 + {case}.logits [P,V] f32 (prefill logits at those positions; tiny-real: first
  base token and first grid token of the last image + the last position, tiny-hf: all positions),
  {case}.logits_argmax [L] i64, {case}.logits_lse [L] f32 (every position),
  {case}.logit_cols [C] i64 + {case}.logits_at_cols [L,C] f32 (tiny-real: 8 vocab columns at every position),
  {case}.image_features_rowsum [N] f32 (sum over the hidden dim of each packed image feature = the inputs_embeds
  rows at the <image> positions, in order; localizes packing/unpadding errors),
  {case}.generated [1,20] i64 (generate(do_sample=False, max_new_tokens=20, eos_token_id=None)),
  tiny-real: {case}.prompt_ids [1,T] i64 (tokenizer ids before expansion);
  tiny-hf: {case}.pixel_values [B,5,3,8,8] f32, logits at all positions, no logit_cols/logits_at_cols.
Self-checks (the script aborts if one fails): reloading the saved checkpoint gives bit-identical logits and a clean
loading report; sdpa agrees with eager (< 1e-4); generate() equals a manual no-cache greedy loop; the processor's
token counts equal the model-side count (image_size_to_num_patches/unpad_image) for every pair of the table;
the spec's worked examples; each case's <image> count equals the table.

Run (from the repo root, after make_llava_fixtures.py has made fixtures/tokenizer/):
    ~/.cache/mmreg/pydev/bin/python scripts/make_llava_next_fixtures.py [--out fixtures]
Made with: Python 3.11, transformers 5.17.0, torch 2.11.0 (CPU), tokenizers 0.23.3, safetensors 0.8.0,
Pillow 13.0.0, numpy 2.4.6 (recorded in each golden.json). Deterministic: a rerun gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_llava_fixtures as base  # noqa: E402  (shared helpers and conventions)

REPO = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = base.MAX_NEW_TOKENS
SEED = 20240701
# tiny-real weight seed: with some seeds the 20 greedy tokens of the long prompts (2-4k positions, attention spread
# over the image tokens) collapse to one repeated token, which would test the KV-cache decode only weakly. SEED + 14
# was picked from SEED + 11 .. SEED + 17 as the first whose every case yields >= 10 distinct tokens (asserted).
REAL_WEIGHT_SEED = SEED + 14
MIN_DISTINCT_GENERATED = 10
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
IMAGE_TOKEN = 32000

PROMPT_ONE = "[INST] <image>\nWhat is shown in this image? [/INST]"
PROMPT_TWO = "[INST] <image>\n<image>\nCompare them. [/INST]"

# llava-hf/llava-v1.6-mistral-7b-hf preprocessor_config.json (= fixtures/configs/llava-v1.6/, checked below).
NEXT_PREPROCESSOR_CONFIG = {
    "aspect_ratio_setting": "anyres",
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": PINPOINTS,
    "image_mean": base.CLIP_MEAN,
    "image_processor_type": "LlavaNextImageProcessor",
    "image_std": base.CLIP_STD,
    "processor_class": "LlavaNextProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}

NEXT_PROCESSOR_CONFIG = {
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaNextProcessor",
    "vision_feature_select_strategy": "default",
}

TINY_REAL_HUB_CONFIG = {
    # Written like llava-hf/llava-v1.6-mistral-7b-hf's config.json: only non-default keys (text hidden_act silu,
    # head_dim = hidden/heads; vision quick_gelu, layer_norm_eps 1e-5; multimodal_projector_bias true and
    # tie_word_embeddings false come from the class defaults), incl. the hub's ignored extras
    # (ignore_index, use_image_newline_parameter, vision vocab_size).
    "architectures": ["LlavaNextForConditionalGeneration"],
    "ignore_index": -100,
    "image_grid_pinpoints": PINPOINTS,
    "image_token_index": IMAGE_TOKEN,
    "model_type": "llava_next",
    "projector_hidden_act": "gelu",
    "text_config": {
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": transformers.__version__,
    "use_image_newline_parameter": True,
    "vision_config": {
        "hidden_size": 32,
        "image_size": 336,
        "intermediate_size": 37,
        "model_type": "clip_vision_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                     "transformers_version": transformers.__version__}

# file -> (h, w, pattern); "synth" = make_llava_fixtures.synth_image(h, w, k), "stripes" = huge_image (compresses well)
IMAGES = {
    "portrait_500x316.png": (500, 316, ("synth", 0)),
    "landscape_480x640.png": (480, 640, ("synth", 1)),
    "square_336x336.png": (336, 336, ("synth", 2)),
    "tiny_10x7.png": (10, 7, ("synth", 0)),
    "huge_1100x1900.png": (1100, 1900, ("stripes", 0)),
}
CASES = [
    ("portrait", PROMPT_ONE, ["portrait_500x316.png"]),
    ("landscape", PROMPT_ONE, ["landscape_480x640.png"]),
    ("square", PROMPT_ONE, ["square_336x336.png"]),
    ("tiny", PROMPT_ONE, ["tiny_10x7.png"]),
    ("huge", PROMPT_ONE, ["huge_1100x1900.png"]),
    ("two_images", PROMPT_TWO, ["portrait_500x316.png", "landscape_480x640.png"]),  # 3 + 5 patches -> batch pad
]

# Token-count table: all (h, w) pairs of these values.
EDGE_VALUES = [1, 2, 3, 13, 14, 15, 167, 168, 169, 335, 336, 337, 503, 504, 505, 671, 672, 673, 1007, 1008, 1009,
               1343, 1344, 1345, 2000]
TABLE_VALUES = sorted(set(EDGE_VALUES) | set(range(1, 2001, 37)))
WORKED_EXAMPLES = [  # spec section 10 (+ the case images)
    ((336, 336), 1176), ((480, 640), 2340), ((1024, 1024), 2928), ((500, 316), 1526), ((100, 1000), 1160),
    ((1080, 1920), 1948), ((899, 1024), 2634), ((200, 300), 1464), ((10, 7), None), ((1100, 1900), None),
]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def f32_sha256(t: torch.Tensor) -> str:
    a = np.ascontiguousarray(t.detach().cpu().numpy().astype("<f4"))
    return hashlib.sha256(a.tobytes()).hexdigest()


def huge_image(h: int, w: int) -> Image.Image:
    """Large smooth test image that PNG compresses well (~30 KB at 1100x1900); integer arithmetic only."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = (255 * x) // (w - 1)
    g = (255 * y) // (h - 1)
    t = (x + 2 * y) % 256
    b = np.minimum(np.abs(t - 128) * 2, 255)  # triangle wave along x + 2y
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8), "RGB")


def make_image(h: int, w: int, pattern) -> Image.Image:
    kind, k = pattern
    return base.synth_image(h, w, k) if kind == "synth" else huge_image(h, w)


def reinit_(model: torch.nn.Module, seed: int):
    """make_llava_fixtures.reinit_ plus a rule for LLaVA-NeXT's image_newline (N(0, 1), like a token embedding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.split(".")[-2] if "." in name else name
            if name.endswith(".bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif "norm" in leaf and name.endswith(".weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("class_embedding") or "position_embedding" in name:
                v = 0.5 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name or name.endswith("image_newline"):
                v = torch.randn(p.shape, generator=g)
            elif p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) / fan_in ** 0.5
            else:
                raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(v)


def legacy_key(k: str) -> str:
    for a, b in [("model.vision_tower.", "vision_tower.vision_model."),
                 ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("model.language_model.", "language_model.model."),
                 ("model.image_newline", "image_newline"),
                 ("lm_head.", "language_model.lm_head.")]:
        if k.startswith(a):
            return b + k[len(a):]
    raise KeyError(k)


def image_spans(ids: list[int], image_token: int) -> list[tuple[int, int]]:
    spans, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == image_token:
            j = i
            while j + 1 < n and ids[j + 1] == image_token:
                j += 1
            spans.append((i, j))
            i = j + 1
        else:
            i += 1
    return spans


def pick_positions(ids: list[int], image_token: int, base_tokens: int) -> list[int]:
    """Three positions (full-vocab logits cost 128 KB each): the first base token and the first grid token
    (start + 576) of the last image, and the last position. For two_images that is image 2, whose base token
    only comes out right if the zero padding patches of image 1 were skipped."""
    n = len(ids)
    s = image_spans(ids, image_token)[-1][0]
    return sorted(p for p in {s, s + base_tokens, n - 1} if 0 <= p < n)


def merged_embeds(model, input_ids, pixel_values, image_sizes) -> torch.Tensor:
    captured = {}

    def hook(_mod, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)
    h.remove()
    return captured["embeds"]


def manual_greedy(model, embeds: torch.Tensor, n_new: int) -> list[int]:
    """Argmax loop without KV cache on the merged prompt embeddings (what the language model sees at prefill)."""
    embed_tokens = model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            hs = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            nxt = int(model.lm_head(hs[:, -1]).argmax(-1))
            out.append(nxt)
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[nxt]]))], dim=1)
    return out


def run_case(eager, sdpa, name, input_ids, pixel_values, image_sizes, image_token, all_positions, col_ids,
             tensors, meta):
    base_tokens = (eager.config.vision_config.image_size // eager.config.vision_config.patch_size) ** 2
    feed = dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)
    with torch.no_grad():
        logits = eager(**feed).logits[0]  # [L, V]
        logits_sdpa = sdpa(**feed).logits[0]
        gen = eager.generate(**feed, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None)
        feats = eager.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
    feats = torch.cat(list(feats), dim=0)  # packed features of all images, in order [N, D]
    new = gen[:, input_ids.shape[1]:]
    assert new.shape == (1, MAX_NEW_TOKENS), new.shape
    assert torch.equal(gen[:, : input_ids.shape[1]], input_ids)
    embeds = merged_embeds(eager, input_ids, pixel_values, image_sizes)
    mask = input_ids[0] == image_token
    assert int(mask.sum()) == feats.shape[0], (int(mask.sum()), feats.shape)
    assert torch.equal(embeds[0, mask], feats)
    manual = manual_greedy(eager, embeds, MAX_NEW_TOKENS)
    assert manual == new[0].tolist(), (manual, new[0].tolist())
    sdpa_diff = float((logits - logits_sdpa).abs().max())
    assert sdpa_diff < 1e-4, sdpa_diff
    ids = input_ids[0].tolist()
    pos = list(range(len(ids))) if all_positions else pick_positions(ids, image_token, base_tokens)
    tensors[f"{name}.input_ids"] = input_ids.to(torch.int64).contiguous()
    tensors[f"{name}.image_sizes"] = image_sizes.to(torch.int64).contiguous()
    tensors[f"{name}.logit_positions"] = torch.tensor(pos, dtype=torch.int64)
    tensors[f"{name}.logits"] = logits[pos].contiguous()
    tensors[f"{name}.logits_argmax"] = logits.argmax(-1).to(torch.int64).contiguous()
    tensors[f"{name}.logits_lse"] = torch.logsumexp(logits, -1).contiguous()
    if col_ids is not None:
        tensors[f"{name}.logit_cols"] = torch.tensor(col_ids, dtype=torch.int64)
        tensors[f"{name}.logits_at_cols"] = logits[:, col_ids].contiguous()
    tensors[f"{name}.image_features_rowsum"] = feats.sum(-1).contiguous()
    tensors[f"{name}.generated"] = new.to(torch.int64).contiguous()
    spans = image_spans(ids, image_token)
    meta[name] = {
        "seq_len": len(ids),
        "num_image_tokens": [e - s + 1 for s, e in spans],
        "image_token_spans": [[s, e] for s, e in spans],
        "image_sizes": image_sizes.tolist(),
        "logit_positions": pos,
        "max_abs_logit": float(logits.abs().max()),
        "eager_vs_sdpa_max_abs_diff": sdpa_diff,
        "generated": new[0].tolist(),
        "generate_equals_manual_no_cache_greedy": True,
    }
    print(f"[{name}] L={len(ids)} image_tokens={meta[name]['num_image_tokens']} pv={tuple(pixel_values.shape)} "
          f"max|logit|={meta[name]['max_abs_logit']:.4f} eager-vs-sdpa={sdpa_diff:.3e} positions={pos} "
          f"generated={new[0].tolist()}")


def check_reload_identical(model, path: Path, feed: dict):
    re_model, info = LlavaNextForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    re_model.eval()
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading info not clean: {bad}"
    with torch.no_grad():
        a = model(**feed).logits
        b = re_model(**feed).logits
    assert torch.equal(a, b), float((a - b).abs().max())
    sd_a, sd_b = model.state_dict(), re_model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def load_pair(path: Path):
    eager = LlavaNextForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    sdpa = LlavaNextForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                             attn_implementation="sdpa").eval()
    assert eager.dtype == torch.float32
    return eager, sdpa


def pillow13_vertical_first(in_hw, out_hw) -> bool:
    """Pillow >= 13 pass order (spec 1.3): vertical pass first iff out_h < in_h and (in_h-out_h) > 2*(in_w-out_w)."""
    (ih, iw), (oh, ow) = in_hw, out_hw
    return oh < ih and (ih - oh) > 2 * (iw - ow)


def anyres_geometry(h: int, w: int, processor: LlavaNextProcessor) -> dict:
    """What HF does with an (h, w) image, from HF's own functions."""
    bh, bw = select_best_resolution((h, w), PINPOINTS)
    nh, nw = get_patch_output_size(np.zeros((3, h, w), np.uint8), (bh, bw), input_data_format="channels_first")
    py, ry = divmod(bh - nh, 2)
    px, rx = divmod(bw - nw, 2)
    nph, npw = get_anyres_image_grid_shape((h, w), PINPOINTS, 336)
    grid = unpad_image(torch.empty(0, nph * 24, npw * 24), (h, w))
    uh, uw = grid.shape[1:]
    n_model = 576 + uh * (uw + 1)
    n_proc = processor._get_num_multimodal_tokens(image_sizes=[(h, w)]).num_image_tokens[0]
    assert n_model == n_proc, (h, w, n_model, n_proc)
    return {
        "size_hw": [h, w],
        "best_resolution_hw": [bh, bw],
        "num_patches": image_size_to_num_patches((h, w), PINPOINTS, 336),
        "base_resize": {"from_hw": [h, w], "to_hw": [336, 336],
                        "pillow13_vertical_first": pillow13_vertical_first((h, w), (336, 336)),
                        "identity": (h, w) == (336, 336)},
        "patch_resize": {"from_hw": [h, w], "to_hw": [nh, nw],
                         "pillow13_vertical_first": pillow13_vertical_first((h, w), (nh, nw)),
                         "identity": (h, w) == (nh, nw)},
        "patch_pad_top_bottom_left_right": [py, py + ry, px, px + rx],
        "unpadded_grid_hw": [uh, uw],
        "num_image_tokens": n_proc,
    }


# ----------------------------------------------------------------------------------------------------------------
# 1. llava-next-tiny-hf
# ----------------------------------------------------------------------------------------------------------------


def make_tiny_hf(out: Path):
    path = out / "llava-next-tiny-hf"
    if path.exists():
        shutil.rmtree(path)
    torch.manual_seed(SEED)
    text = LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, hidden_act="gelu", max_position_embeddings=580,
                       initializer_range=0.02, pad_token_id=1)
    vision = CLIPVisionConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, projection_dim=32,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              initializer_range=0.02)
    cfg = LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=0, projector_hidden_act="gelu",
                          vision_feature_select_strategy="default", vision_feature_layer=-1,
                          image_grid_pinpoints=[[16, 16]])
    model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    reinit_(model, SEED + 1)
    model.save_pretrained(str(path))
    pre = {k: v for k, v in NEXT_PREPROCESSOR_CONFIG.items() if k != "aspect_ratio_setting"}
    pre.update(crop_size={"height": 8, "width": 8}, size={"shortest_edge": 8}, image_grid_pinpoints=[[16, 16]])
    base.dump_json(path / "preprocessor_config.json", pre)

    g = torch.Generator().manual_seed(SEED + 2)

    def text_ids(n):
        return torch.randint(2, 99, (n,), generator=g).tolist()  # avoid 0 (image) and 1 (pad)

    # tokens per image: base 2x2 = 4, grid 2x2 patches of 2x2 -> 4x4 (unpadded) + 4 newlines = 20  => 24.
    # "unpad" (extra): image_sizes (8,5) -> grid 4x2 (+4 newlines) -> 16; (3,8) -> grid 2x4 (odd pad keeps 2
    # rows, not 1) + 2 newlines -> 14.  pixel_values are (B, 5, 3, 8, 8) in every case.
    img = lambda n: [0] * n  # noqa: E731
    cases = {
        "one_image": (text_ids(3) + img(24) + text_ids(6), [[8, 8]]),
        "two_images": (text_ids(3) + img(24) + text_ids(2) + img(24) + text_ids(5), [[8, 8], [8, 8]]),
        "unpad": (text_ids(2) + img(16) + text_ids(2) + img(14) + text_ids(4), [[8, 5], [3, 8]]),
    }
    cases = {k: (torch.tensor([ids]), torch.rand(len(sz), 5, 3, 8, 8, generator=g), torch.tensor(sz))
             for k, (ids, sz) in cases.items()}
    ids, pv, sz = cases["one_image"]
    check_reload_identical(model, path, dict(input_ids=ids, pixel_values=pv, image_sizes=sz))
    eager, sdpa = load_pair(path)
    tensors, meta = {}, {
        "fixture": "llava-next-tiny-hf",
        "made_by": "scripts/make_llava_next_fixtures.py",
        "versions": base.versions(),
        "attn_implementation": "eager (sdpa only for the cross-check)",
        "dtype": "float32",
        "inputs": "token-id prompts (text ids uniform in [2,99), image token 0 repeated per image) and "
                  "pixel_values (B,5,3,8,8) uniform [0,1) from torch.Generator seed %d; image_sizes as given "
                  "(the model does not look at the pixels to check them)" % (SEED + 2),
        "eos_disabled_by": "generate(..., eos_token_id=None) kwarg; checked against a manual no-cache argmax loop",
        "logit_positions": "all positions (vocab is only 99)",
        "cases": {},
    }
    for name, (ids, pv, sz) in cases.items():
        run_case(eager, sdpa, name, ids, pv, sz, 0, True, None, tensors, meta["cases"])
        tensors[f"{name}.pixel_values"] = pv.contiguous()
        meta["cases"][name]["pixel_values_shape"] = list(pv.shape)
    assert meta["cases"]["one_image"]["num_image_tokens"] == [24]
    assert meta["cases"]["unpad"]["num_image_tokens"] == [16, 14]
    base.write_golden(path, tensors, meta)
    return path


# ----------------------------------------------------------------------------------------------------------------
# 2. llava-next-tiny-real
# ----------------------------------------------------------------------------------------------------------------


def make_tiny_real(out: Path, tok_dir: Path):
    path = out / "llava-next-tiny-real"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    base.dump_json(path / "config.json", TINY_REAL_HUB_CONFIG)
    base.dump_json(path / "generation_config.json", GENERATION_CONFIG)
    base.dump_json(path / "preprocessor_config.json", NEXT_PREPROCESSOR_CONFIG)
    hub_pre = out / "configs" / "llava-v1.6" / "preprocessor_config.json"
    if hub_pre.exists():
        assert json.loads(hub_pre.read_text()) == NEXT_PREPROCESSOR_CONFIG, "differs from configs/llava-v1.6"
    base.dump_json(path / "processor_config.json", NEXT_PROCESSOR_CONFIG)
    for f in base.TOKENIZER_FILES:
        shutil.copyfile(tok_dir / f, path / f)

    cfg = LlavaNextConfig.from_pretrained(str(path))
    t, v = cfg.text_config, cfg.vision_config
    parsed = dict(text_type=t.model_type, text_act=t.hidden_act, rms=t.rms_norm_eps, kv=t.num_key_value_heads,
                  head_dim=t.head_dim, rope=t.rope_parameters, sliding_window=t.sliding_window,
                  vis_act=v.hidden_act, ln=v.layer_norm_eps, proj_bias=cfg.multimodal_projector_bias,
                  layer=cfg.vision_feature_layer, tie=cfg.tie_word_embeddings, img=cfg.image_token_id,
                  pinpoints=cfg.image_grid_pinpoints)
    print("[tiny-real] parsed config:", parsed)
    assert t.model_type == "mistral" and type(t).__name__ == "MistralConfig"
    assert (t.hidden_act, t.rms_norm_eps, t.num_key_value_heads, t.head_dim) == ("silu", 1e-5, 2, 8)
    assert t.rope_parameters["rope_theta"] == 1e6 and t.rope_parameters.get("rope_type", "default") == "default"
    assert t.sliding_window is None and t.max_position_embeddings == 32768
    assert (v.hidden_act, v.layer_norm_eps, v.image_size, v.patch_size) == ("quick_gelu", 1e-5, 336, 14)
    assert cfg.multimodal_projector_bias and not cfg.tie_word_embeddings and cfg.image_token_id == IMAGE_TOKEN
    assert cfg.image_grid_pinpoints == PINPOINTS and cfg.vision_feature_layer == -2

    torch.manual_seed(SEED + 10)
    model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation="eager").to(torch.float32)
    model.eval()
    reinit_(model, REAL_WEIGHT_SEED)
    with torch.no_grad():  # round every weight to bf16 (goldens use these exact values, upcast to f32)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))

    with tempfile.TemporaryDirectory() as tmp:  # what 5.17's save_pretrained would write (recorded only)
        model.save_pretrained(tmp)
        native_keys = sorted(base.list_safetensors(Path(tmp)).keys())

    sd = model.state_dict()
    legacy = {legacy_key(k): v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    assert len(legacy) == len(sd)
    save_file(dict(sorted(legacy.items())), str(path / "model.safetensors"), metadata={"format": "pt"})

    img_dir = path / "images"
    img_dir.mkdir()
    images = {}
    for fname, (h, w, pattern) in IMAGES.items():
        make_image(h, w, pattern).save(img_dir / fname, format="PNG", optimize=False, compress_level=9)
        im = Image.open(img_dir / fname).convert("RGB")
        im.load()
        assert im.size == (w, h)
        images[fname] = im

    processor = AutoProcessor.from_pretrained(str(path), backend="pil")
    assert type(processor) is LlavaNextProcessor, type(processor)
    assert type(processor.image_processor) is LlavaNextImageProcessorPil, type(processor.image_processor)
    assert type(processor.tokenizer).__name__ == "TokenizersBackend", type(processor.tokenizer)
    assert processor.num_additional_image_tokens == 1 and processor.patch_size == 14
    assert processor.vision_feature_select_strategy == "default" and processor.image_token_id == IMAGE_TOKEN

    image_meta = {}
    per_image_pv = {}
    for fname, im in images.items():
        h, w = IMAGES[fname][:2]
        enc = processor.image_processor(images=[im], return_tensors="pt")
        pv = enc.pixel_values[0]
        assert enc.pixel_values.dtype == torch.float32 and enc.image_sizes.tolist() == [[h, w]]
        per_image_pv[fname] = pv
        geo = anyres_geometry(h, w, processor)
        assert pv.shape == (geo["num_patches"], 3, 336, 336), pv.shape
        image_meta[fname] = {
            "png_sha256": base.sha256(img_dir / fname),
            **geo,
            "pixel_values_shape": list(pv.shape),
            "pixel_values_sha256": f32_sha256(pv),
            "patch_sha256": [f32_sha256(p) for p in pv],
            "patch_sum_f64": [float(p.double().sum()) for p in pv],
        }
        print(f"[image] {fname}: {geo}")

    g = torch.Generator().manual_seed(SEED + 12)
    col_ids = [2, 13, 29871, IMAGE_TOKEN] + torch.randint(3, 32000, (4,), generator=g).tolist()
    raw_tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    cases = {}
    tokenization = {}
    for name, text, files in CASES:
        imgs = [images[f] for f in files]
        enc = processor(images=imgs, text=text, return_tensors="pt")
        prompt_ids = processor.tokenizer(text).input_ids
        raw = raw_tok.encode(text)
        assert prompt_ids == raw.ids, (prompt_ids, raw.ids)
        tokenization[text] = {"ids": raw.ids, "tokens": raw.tokens}
        expect = [image_meta[f]["num_image_tokens"] for f in files]
        ids = enc.input_ids[0].tolist()
        assert [e - s + 1 for s, e in image_spans(ids, IMAGE_TOKEN)] == expect, name
        # the expansion is a plain replacement of each <image> by N copies
        exp_ids = []
        k = 0
        for i in prompt_ids:
            if i == IMAGE_TOKEN:
                exp_ids += [IMAGE_TOKEN] * expect[k]
                k += 1
            else:
                exp_ids.append(i)
        assert ids == exp_ids, name
        assert enc.image_sizes.dtype == torch.int64
        assert enc.image_sizes.tolist() == [image_meta[f]["size_hw"] for f in files]
        pv = enc.pixel_values
        pmax = max(image_meta[f]["num_patches"] for f in files)
        assert pv.shape == (len(files), pmax, 3, 336, 336), pv.shape
        for b, f in enumerate(files):  # each image = its own processing, then zero patches up to pmax
            n = image_meta[f]["num_patches"]
            assert torch.equal(pv[b, :n], per_image_pv[f])
            assert bool((pv[b, n:] == 0).all())
        cases[name] = (text, files, enc, prompt_ids)

    text, files, enc, _ = cases["two_images"]
    check_reload_identical(model, path, dict(input_ids=enc.input_ids, pixel_values=enc.pixel_values,
                                             image_sizes=enc.image_sizes))
    eager, sdpa = load_pair(path)
    tensors, meta = {}, {
        "fixture": "llava-next-tiny-real",
        "made_by": "scripts/make_llava_next_fixtures.py",
        "versions": base.versions(),
        "attn_implementation": "eager (sdpa only for the cross-check)",
        "dtype": "float32 compute; checkpoint stored bf16 and loaded with dtype=torch.float32",
        "processor": "AutoProcessor.from_pretrained(dir, backend='pil') = LlavaNextProcessor(LlavaNextImageProcessorPil,"
                     " %s)" % type(processor.tokenizer).__name__,
        "pixel_values_sha256": "sha256 of the float32 little-endian bytes (C order) of HF's pixel_values; per case "
                               "the whole (B, P_max, 3, 336, 336) batch, per image the (P, 3, 336, 336) tensor of "
                               "that image processed alone (= the batch row without its zero padding patches), "
                               "and per patch",
        "pillow13_vertical_first": "Pillow >= 13 resizes vertically first iff out_h < in_h and "
                                   "(in_h - out_h) > 2 * (in_w - out_w) (spec 1.3)",
        "eos_disabled_by": "generate(..., eos_token_id=None) kwarg; checked against a manual no-cache argmax loop",
        "logit_positions": "first base token and first grid token (start + 576) of the last image, last position",
        "weight_seed": REAL_WEIGHT_SEED,
        "images": image_meta,
        "tokenization": {
            "note": "processor.tokenizer is %s (transformers %s forces TokenizersBackend for model_type "
                    "llava_next), i.e. tokenizer.json as written = the Rust tokenizers crate"
                    % (type(processor.tokenizer).__name__, transformers.__version__),
            "prompts": tokenization,
        },
        "safetensors_keys_written_by_save_pretrained_%s" % transformers.__version__: native_keys,
        "cases": {},
    }
    for name, (text, files, enc, prompt_ids) in cases.items():
        tensors[f"{name}.prompt_ids"] = torch.tensor([prompt_ids], dtype=torch.int64)
        run_case(eager, sdpa, name, enc.input_ids, enc.pixel_values, enc.image_sizes, IMAGE_TOKEN, False, col_ids,
                 tensors, meta["cases"])
        c = meta["cases"][name]
        assert len(set(c["generated"])) >= MIN_DISTINCT_GENERATED, (name, c["generated"])
        c["prompt"] = text
        c["images"] = files
        c["pixel_values_shape"] = list(enc.pixel_values.shape)
        c["pixel_values_sha256"] = f32_sha256(enc.pixel_values)
        c["num_patches"] = [image_meta[f]["num_patches"] for f in files]
    base.write_golden(path, tensors, meta)
    return path, native_keys


# ----------------------------------------------------------------------------------------------------------------
# 3. token-count table
# ----------------------------------------------------------------------------------------------------------------


def make_token_counts(out: Path, real_path: Path):
    processor = AutoProcessor.from_pretrained(str(real_path), backend="pil")
    vals = TABLE_VALUES
    tokens, best_idx, patches = [], [], []
    pin = [tuple(p) for p in PINPOINTS]
    for h in vals:
        row_t, row_b, row_p = [], [], []
        n_list = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w in vals]).num_image_tokens
        for w, n in zip(vals, n_list):
            # same number via the replace_image_token path (_get_number_of_features(h, w, 336, 336) - 1) ...
            assert n == processor._get_number_of_features(h, w, 336, 336) - 1
            # ... and via the model side: 576 + H' * (W' + 1) from get_anyres_image_grid_shape + unpad_image
            nph, npw = get_anyres_image_grid_shape((h, w), PINPOINTS, 336)
            uh, uw = unpad_image(torch.empty(0, nph * 24, npw * 24), (h, w)).shape[1:]
            assert n == 576 + uh * (uw + 1), (h, w)
            best = select_best_resolution((h, w), PINPOINTS)
            row_t.append(n)
            row_b.append(pin.index(tuple(best)))
            row_p.append(image_size_to_num_patches((h, w), PINPOINTS, 336))
        tokens.append(row_t)
        best_idx.append(row_b)
        patches.append(row_p)
    # end to end on real pixels for a few extreme sizes: processor(text, image) expands <image> to the table value
    for h, w in [(1, 1), (1, 2), (3, 13), (13, 2000), (2000, 13), (337, 1009), (1345, 1343)]:
        enc = processor(images=[base.synth_image(max(h, 2), max(w, 2), 0).resize((w, h))], text="<image>",
                        return_tensors="pt")
        assert enc.image_sizes.tolist() == [[h, w]]
        n = int((enc.input_ids == IMAGE_TOKEN).sum())
        assert n == tokens[vals.index(h)][vals.index(w)], (h, w, n)
        assert enc.pixel_values.shape[1] == patches[vals.index(h)][vals.index(w)]
    examples = []
    for (h, w), expect in WORKED_EXAMPLES:
        geo = anyres_geometry(h, w, processor)
        if expect is not None:
            assert geo["num_image_tokens"] == expect, (h, w, geo["num_image_tokens"], expect)
        examples.append({"h": h, "w": w, "tokens": geo["num_image_tokens"],
                         "best_resolution_hw": geo["best_resolution_hw"], "num_patches": geo["num_patches"],
                         "unpadded_grid_hw": geo["unpadded_grid_hw"]})
    doc = {
        "made_by": "scripts/make_llava_next_fixtures.py",
        "versions": {k: v for k, v in base.versions().items() if k in ("python", "transformers", "torch")},
        "source": "LlavaNextProcessor._get_num_multimodal_tokens(image_sizes=[(h, w)]) of transformers %s with the "
                  "llava-v1.6-mistral-7b-hf processor config (patch_size 14, vision_feature_select_strategy "
                  "default, num_additional_image_tokens 1) and preprocessor config (shortest_edge 336, crop 336, "
                  "default pinpoints); checked equal to _get_number_of_features(h, w, 336, 336) - 1 (the path "
                  "the processor's <image> expansion uses) and to the model side 576 + H'*(W'+1) "
                  "(get_anyres_image_grid_shape + unpad_image) for every pair" % transformers.__version__,
        "layout": "tokens[i][j], best_pinpoint[i][j], num_patches[i][j] are for height = heights[i], width = "
                  "widths[j]; best_pinpoint indexes pinpoints (select_best_resolution); tokens = number of <image> "
                  "tokens one image expands to (576 base + H'*(W'+1) grid rows with newline)",
        "note": "computed from the sizes (spot-checked end to end with the processor on real pixels for 7 extreme sizes); very small images get many tokens because every pinpoint "
                "ties on effective resolution and the first one (336x672) wins, e.g. 1x2 -> 1752, 1x1 -> 1176",
        "pinpoints": PINPOINTS,
        "heights": vals,
        "widths": vals,
        "worked_examples": examples,
        "tokens": tokens,
        "best_pinpoint": best_idx,
        "num_patches": patches,
    }
    p = out / "llava-next-token-counts.json"
    # compact layout: one line per scalar/list field, one line per worked example and per table row
    lines = []
    for k, v in doc.items():
        if k in ("tokens", "best_pinpoint", "num_patches", "worked_examples"):
            body = ",\n".join("  " + json.dumps(r, separators=(", ", ": ") if k == "worked_examples" else (",", ":"))
                               for r in v)
            lines.append(f' "{k}": [\n{body}\n ]')
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    assert json.loads(text) == json.loads(json.dumps(doc))
    p.write_text(text, encoding="utf-8")
    print(f"[token-counts] {len(vals)}x{len(vals)} pairs, min {min(map(min, tokens))}, max {max(map(max, tokens))}")
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "fixtures"), help="output directory (default: repo fixtures/)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    print("versions:", base.versions())
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tok_dir = REPO / "fixtures" / "tokenizer"
    assert (tok_dir / "tokenizer.json").exists(), "run scripts/make_llava_fixtures.py first (fixtures/tokenizer/)"

    hf_path = make_tiny_hf(out)
    real_path, native_keys = make_tiny_real(out, tok_dir)
    counts = make_token_counts(out, real_path)

    for d in (hf_path, real_path):  # safetensors writes 0600 files
        for f in [d, *d.rglob("*")]:
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
    os.chmod(counts, 0o644)
    for p in (hf_path, real_path):
        print(f"\n== {p.name}: safetensors keys ==")
        for k, d in base.list_safetensors(p).items():
            if d["file"] != "golden.safetensors":
                print(f"  {d['file']}  {k}  {d['shape']}  {d['dtype']}")
    print(f"\n== 5.17 save_pretrained keys (tiny-real, recorded in golden.json): {len(native_keys)} ==")
    for k in native_keys:
        if ".layers." not in k or ".layers.0." in k:
            print("  ", k)
    files = [f for d in (hf_path, real_path) for f in d.rglob("*") if f.is_file()] + [counts]
    total = sum(f.stat().st_size for f in files)
    dup = sum(f.stat().st_size for f in files if f.name in base.TOKENIZER_FILES)
    print(f"\ntotal size added: {total / 1e6:.2f} MB ({(total - dup) / 1e6:.2f} MB without the tokenizer copies, "
          f"which are byte-identical to fixtures/tokenizer/ and stored once by git)")


if __name__ == "__main__":
    main()
