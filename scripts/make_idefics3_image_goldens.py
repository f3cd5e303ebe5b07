#!/usr/bin/env python3
"""Writes the Idefics3 / SmolVLM image goldens that mmreg-image/tests/idefics3_parity.rs checks.

Run from the repository root with a venv holding transformers 5.17, Pillow 13 and numpy (torchvision
is not needed: only the PIL classes are used), single-threaded:

    OMP_NUM_THREADS=1 nice /work/venv-hf/bin/python scripts/make_idefics3_image_goldens.py

Output: fixtures/idefics3-image/goldens.json, with

  configs   the preprocessor configs used, by name, and the HF class each is given to:
              idefics3          HuggingFaceM4/Idefics3-8B-Llama3's preprocessor_config.json, which is
                                also `Idefics3ImageProcessorPil`'s class default (LANCZOS, longest
                                edge 4 * 364 = 1456, tiles of 364, mean / std 0.5, split, pad)
              smolvlm           HuggingFaceTB/SmolVLM-256M-Instruct's (longest edge 2048, tiles of 512);
                                `SmolVLMImageProcessorPil`'s class defaults are Idefics3's (1456 / 364)
              idefics3_nosplit  do_image_splitting and do_pad off: one 364 x 364 image, no mask
              smolvlm_noresize_bicubic  do_resize off and BICUBIC: the input itself is resized to
                                multiples of 512 and split
  images    per fixtures/images/*.png and config: HF's pixel_values shape, rows / cols, sha256 of
            the float32 little-endian C-order bytes, sampled values, and pixel_attention_mask's shape,
            sum and sha256 of its int64 little-endian bytes (or HF's error)
  sweep     per sweep config and (height, width): the rows / cols the processor returns, the number
            of frames, `<image>` tokens in the prompt, and what HF's `get_number_of_image_patches`
            says. Pixels are skipped: `PilBackend.resize`'s call to `image_transforms.resize` is
            swapped for one returning zeros of the requested size, so the processor's own code picks
            every size (checked against the unpatched processor on a few sizes)
  prompts   the text HF's processors put in place of one `<image>`: Idefics3Processor's
            `replace_image_token` and SmolVLM's `get_image_prompt_string`, for several grids
  image_seq_len  `int(((image_size // patch_size) ** 2) / (scale_factor ** 2))` for a few models
"""

import copy
import hashlib
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL
import transformers
import transformers.image_processing_backends as backends
from PIL import Image
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.idefics3.processing_idefics3 import Idefics3Processor
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
OUT = FIXTURES / "idefics3-image"
SAMPLES_PER_OUTPUT = 12
SEED = 20250514

IDEFICS3_8B = {
    "do_convert_rgb": True,
    "do_image_splitting": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": 364},
    "resample": 1,
    "rescale_factor": 1 / 255,
    "size": {"longest_edge": 1456},
}
SMOLVLM_256M = {**IDEFICS3_8B, "max_image_size": {"longest_edge": 512}, "size": {"longest_edge": 2048}}

# name -> (HF class, config, image_seq_len of the model the config belongs to)
CONFIGS = {
    "idefics3": ("Idefics3ImageProcessorPil", IDEFICS3_8B, 169),
    "smolvlm": ("SmolVLMImageProcessorPil", SMOLVLM_256M, 64),
    "idefics3_nosplit": (
        "Idefics3ImageProcessorPil",
        {**IDEFICS3_8B, "do_image_splitting": False, "do_pad": False},
        169,
    ),
    "smolvlm_noresize_bicubic": (
        "SmolVLMImageProcessorPil",
        {**SMOLVLM_256M, "do_resize": False, "resample": 3},
        64,
    ),
}
# Sweep-only configs (no pixels): the size logic's corners.
SWEEP_CONFIGS = {
    "idefics3": CONFIGS["idefics3"],
    "smolvlm": CONFIGS["smolvlm"],
    "idefics3_noresize": ("Idefics3ImageProcessorPil", {**IDEFICS3_8B, "do_resize": False}, 169),
    # A longest edge over MAX_IMAGE_SIZE (4096) and not a multiple of the tile.
    "upper_bound": ("Idefics3ImageProcessorPil", {**IDEFICS3_8B, "size": {"longest_edge": 5000}, "max_image_size": {"longest_edge": 700}}, 169),
    # An exact-size first resize.
    "height_width": ("SmolVLMImageProcessorPil", {**SMOLVLM_256M, "size": {"height": 700, "width": 1100}}, 64),
    "nosplit": CONFIGS["idefics3_nosplit"],
}
CLASSES = {"Idefics3ImageProcessorPil": Idefics3ImageProcessorPil, "SmolVLMImageProcessorPil": SmolVLMImageProcessorPil}


def processor(name, configs=CONFIGS):
    cls, cfg, _ = configs[name]
    return CLASSES[cls](**copy.deepcopy(cfg))


def digest(arr, dtype):
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=dtype).tobytes()).hexdigest()


def samples(arr, rng):
    flat = np.ascontiguousarray(arr, dtype="<f4").reshape(-1)
    idx = sorted({0, flat.size - 1, *rng.integers(0, flat.size, SAMPLES_PER_OUTPUT - 2).tolist()})
    return [[int(i), float(flat[i])] for i in idx]


def run(p, image):
    """HF's outputs for one image: pixel values [n, 3, H, W] (the batch axis of one sample
    dropped), the mask [n, H, W] or None, rows, cols."""
    out = p(image, return_row_col_info=True)
    pixels = out["pixel_values"]
    # With do_pad, arrays [1, n, 3, H, W]; without, a list (one sample) of lists of arrays.
    pixels = np.asarray(pixels[0]) if isinstance(pixels, np.ndarray) else np.stack(pixels[0])
    mask = out.get("pixel_attention_mask")
    mask = None if mask is None else np.asarray(mask)[0]
    return pixels, mask, int(out["rows"][0][0]), int(out["cols"][0][0])


def image_cases(rng):
    cases = []
    for path in sorted((FIXTURES / "images").glob("*.png")):
        with Image.open(path) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
            case = {"image": f"images/{path.name}", "pil_mode": mode, "size_hw": [h, w]}
            for name in CONFIGS:
                try:
                    pixels, mask, rows, cols = run(processor(name), im)
                except Exception as e:  # noqa: BLE001 -- the refusal itself is the golden
                    case[name] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                assert pixels.dtype == np.float32
                entry = {
                    "shape": list(pixels.shape),
                    "rows": rows,
                    "cols": cols,
                    "sha256": digest(pixels, "<f4"),
                    "samples": samples(pixels, rng),
                }
                if mask is not None:
                    assert mask.dtype == np.int64
                    entry["mask"] = {"shape": list(mask.shape), "sum": int(mask.sum()), "sha256": digest(mask, "<i8")}
                case[name] = entry
        cases.append(case)
        grids = {n: (case[n].get("rows"), case[n].get("cols"), case[n].get("shape", [None])[0]) for n in CONFIGS}
        print(f"image {path.name:26s} {mode:5s} {h}x{w} -> {grids}", file=sys.stderr)
    return cases


def sweep_sizes():
    """~200 (height, width) pairs: tiny, extreme aspect ratios, tile multiples +-1, seeded random."""
    sizes = [(1, 1), (1, 2), (2, 1), (2, 4), (4, 2), (3, 3), (5, 7), (7, 5), (1, 4000), (4000, 1), (2, 3000), (3000, 2)]
    sizes += [(1, 1456), (1456, 1), (1, 1457), (1457, 3), (10, 7000), (7000, 10)]
    for m in (364, 512, 700):
        for k in (1, 2, 3):
            for d in (-1, 0, 1):
                sizes += [(m * k + d, m), (m, m * k + d), (m * k + d, m * k + d + 1)]
    sizes += [(1080, 1920), (1920, 1080), (480, 640), (640, 480), (4096, 4096), (5000, 3000), (3000, 5000), (8000, 8000)]
    seen = set()
    sizes = [s for s in sizes if not (s in seen or seen.add(s))]
    rng = np.random.default_rng(SEED)
    while len(sizes) < 200:
        h, w = (int(v) for v in np.exp(rng.uniform(0, np.log(6000), 2)).round().clip(1, 6000))
        if (h, w) not in seen:
            seen.add((h, w))
            sizes.append((h, w))
    return sizes


def zeros_resize(image, size, **_kwargs):
    """Stand-in for `image_transforms.resize`: the requested size, no pixels."""
    return np.zeros((image.shape[0], *size), dtype=np.uint8)


def sweep():
    sizes = sweep_sizes()
    real_resize = backends.np_resize
    # Sizes that cost nothing to process for real, to check the patch changes no grid.
    checked = [(1, 1), (2, 4), (364, 365), (365, 364), (512, 1024), (1080, 1920), (1, 1456)]
    out = {"sizes_hw": [list(s) for s in sizes], "configs": {}}
    for name, (cls, cfg, seq_len) in SWEEP_CONFIGS.items():
        # Rescale / normalize / pad cannot change the grid; turning them off keeps this cheap.
        p = processor(name, SWEEP_CONFIGS)
        light = {"do_rescale": False, "do_normalize": False, "do_pad": False}
        rows_cols = []
        backends.np_resize = zeros_resize
        try:
            for h, w in sizes:
                pixels, _, rows, cols = run_light(p, Image.new("RGB", (w, h)), light)
                prompt = get_image_prompt_string(rows, cols, seq_len, "<fake_token_around_image>", "<image>", "<global-img>")
                helper = [int(v) for v in p.get_number_of_image_patches(h, w)]
                rows_cols.append([rows, cols, len(pixels), prompt.count("<image>"), *helper])
        finally:
            backends.np_resize = real_resize
        for h, w in checked:
            _, _, rows, cols = run_light(p, Image.new("RGB", (w, h)), light)
            i = sizes.index((h, w))
            assert rows_cols[i][:2] == [rows, cols], (name, h, w, rows_cols[i], rows, cols)
        mismatches = sum(1 for r in rows_cols if (r[0], r[1]) != (r[5], r[6]))
        print(f"sweep {name}: {len(sizes)} sizes, get_number_of_image_patches differs on {mismatches}", file=sys.stderr)
        out["configs"][name] = {
            "class": cls,
            "config": cfg,
            "image_seq_len": seq_len,
            "rows_cols_frames_image_tokens_helper": rows_cols,
        }
    out["columns"] = "[rows, cols, frames, <image> tokens in the prompt, helper num_patches, helper rows, helper cols]"
    return out


def run_light(p, image, light):
    out = p(image, return_row_col_info=True, **light)
    return out["pixel_values"][0], None, int(out["rows"][0][0]), int(out["cols"][0][0])


PROMPT_GRIDS = [(0, 0, 1), (0, 0, 3), (1, 1, 2), (1, 2, 1), (2, 1, 1), (2, 3, 2), (3, 4, 1), (6, 6, 1), (7, 2, 1)]
BIG_PROMPT_GRIDS = [(0, 0, 169), (4, 4, 169), (3, 4, 64), (2, 3, 81), (1, 4, 64)]
CUSTOM_TOKENS = ("<F>", "<I>", "<G>")


def idefics3_prompt(rows, cols, seq_len):
    """`Idefics3Processor.replace_image_token` on a stand-in `self` with the processor's tokens."""
    fake_self = SimpleNamespace(
        fake_image_token="<fake_token_around_image>", image_token="<image>", global_image_tag="<global-img>", image_seq_len=seq_len
    )
    return Idefics3Processor.replace_image_token(fake_self, {"rows": [[rows]], "cols": [[cols]]}, 0)


def smolvlm_prompt(rows, cols, seq_len, tokens=("<fake_token_around_image>", "<image>", "<global-img>")):
    fake, image, global_ = tokens
    return get_image_prompt_string(rows, cols, seq_len, fake_token_around_image=fake, image_token=image, global_image_token=global_)


def prompts():
    cases = []
    for rows, cols, seq_len in PROMPT_GRIDS + BIG_PROMPT_GRIDS:
        idefics3, smolvlm = idefics3_prompt(rows, cols, seq_len), smolvlm_prompt(rows, cols, seq_len)
        case = {"rows": rows, "cols": cols, "image_seq_len": seq_len, "same_for_both": idefics3 == smolvlm}
        case["image_tokens"] = idefics3.count("<image>")
        if (rows, cols, seq_len) in PROMPT_GRIDS:
            case["idefics3"], case["smolvlm"] = idefics3, smolvlm
        else:
            case["idefics3_sha256"] = hashlib.sha256(idefics3.encode()).hexdigest()
            case["smolvlm_sha256"] = hashlib.sha256(smolvlm.encode()).hexdigest()
            case["chars"] = len(idefics3)
        cases.append(case)
    custom = [
        {"rows": r, "cols": c, "image_seq_len": n, "tokens": list(CUSTOM_TOKENS), "smolvlm": smolvlm_prompt(r, c, n, CUSTOM_TOKENS)}
        for r, c, n in [(0, 0, 2), (2, 2, 1)]
    ]
    return {"default_tokens": cases, "custom_tokens": custom}


def image_seq_lens():
    # (model, vision image_size, patch_size, scale_factor) from the hub configs / config class defaults.
    models = [
        ("Idefics3-8B-Llama3", 364, 14, 2),
        ("SmolVLM-256M/500M", 512, 16, 4),
        ("SmolVLM-Instruct (2.2B)", 384, 14, 3),
        ("Idefics3Config defaults", 224, 32, 2),
        ("odd", 500, 14, 3),
    ]
    return [
        {"model": m, "image_size": s, "patch_size": p, "scale_factor": f, "image_seq_len": int(((s // p) ** 2) / (f**2))}
        for m, s, p, f in models
    ]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    goldens = {
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "configs": {name: {"class": cls, "config": cfg, "image_seq_len": n} for name, (cls, cfg, n) in CONFIGS.items()},
        "images": image_cases(rng),
        "sweep": sweep(),
        "prompts": prompts(),
        "image_seq_len": image_seq_lens(),
        "format": {
            "shape": "HF pixel_values of the one sample: [frames, 3, H, W] (HF adds a batch axis of 1 with do_pad)",
            "sha256": "of the float32 little-endian C-order bytes of pixel_values",
            "mask": "pixel_attention_mask [frames, H, W]: sha256 of its int64 little-endian bytes, and its sum",
            "samples": "[flat index, value] into pixel_values",
        },
    }
    path = OUT / "goldens.json"
    text = json.dumps(goldens, indent=1)
    # One line per array of numbers (shapes, samples, sweep rows) keeps the file short and readable.
    text = re.sub(r"\[[-+.\deE,\s]*\]", lambda m: re.sub(r"\s+", "", m.group()).replace(",", ", "), text)
    path.write_text(text + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
