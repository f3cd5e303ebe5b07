#!/usr/bin/env python3
"""Writes the Qwen2-VL image/video goldens that mmreg-image/tests/qwen2_vl_parity.rs checks.

Run from the repository root with the dev venv (transformers 5.17, torch, torchvision, Pillow >= 13,
numpy), single-threaded:

    OMP_NUM_THREADS=1 nice ~/.cache/mmreg/pydev/bin/python scripts/make_qwen2_vl_image_goldens.py

Outputs (under fixtures/qwen2-vl-image/):
  frame_{0..3}.png      four deterministic video frames (97x61 RGB, drawn with PIL)
  goldens.json          config resolution cases, and per image / video: pixel_values shape,
                        grid_thw, sha256 of the float32 little-endian bytes, sampled values
  smart-resize.json     `smart_resize` over a sweep of (height, width) pairs and several
                        (min_pixels, max_pixels, factor) settings, refusals included

References:
  * images: `Qwen2VLImageProcessorPil` (the PIL backend) on every fixtures/images/*.png;
  * videos: transformers 5.17 has no PIL video processor (`Qwen2VLVideoProcessor` is torchvision
    only). The goldens are HF's own functions composed as mmreg processes a video: each frame
    through the PIL processor's `process_image` / `resize` (PIL's bicubic, as for images), then the
    video processor's fused `rescale_and_normalize` and `patchify` (temporal padding, flattening
    order). The script checks that composition against `Qwen2VLVideoProcessor` itself on frames
    that need no resize, and records how far that processor is from it on the fixture frames
    (`torchvision_video_processor`: torchvision's resize differs from PIL's).
  * smart_resize: the function in transformers' module, called directly.

Note: passing `min_pixels` / `max_pixels` to `Qwen2VLImageProcessorPil(...)` mutates the class
attribute `size` in 5.17 (later instances inherit it), so every processor here gets a fresh `size`.
"""

import copy
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import transformers
from PIL import Image, ImageDraw
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
OUT = FIXTURES / "qwen2-vl-image"
SAMPLES_PER_OUTPUT = 16
CLASS_SIZE = copy.deepcopy(Qwen2VLImageProcessorPil.size)

# (name, min_pixels, max_pixels) used for pixel goldens.
PIXEL_SETTINGS = [("default", 56 * 56, 28 * 28 * 1280), ("small", 56 * 56, 28 * 28 * 64)]
# Video settings: the image class defaults (Qwen2-VL checkpoints ship one preprocessor_config.json,
# which the video processor loads too) and Qwen2VLVideoProcessor's own class defaults.
VIDEO_SETTINGS = [("image_defaults", 56 * 56, 28 * 28 * 1280), ("video_class_defaults", 128 * 28 * 28, 28 * 28 * 768)]
VIDEO_FRAME_COUNTS = [4, 3, 1]
# (min_pixels, max_pixels, patch_size, merge_size) for the smart_resize sweep.
SWEEP_SETTINGS = [
    (56 * 56, 28 * 28 * 1280, 14, 2),  # class default
    (56 * 56, 28 * 28 * 64, 14, 2),  # small max: the floor branch at ordinary sizes
    (56 * 56, 14 * 14 * 4 * 16384, 14, 2),  # Qwen2-VL / Qwen2.5-VL hub configs (max 12845056)
    (128 * 28 * 28, 28 * 28 * 768, 14, 2),  # video class default: the ceil branch at ordinary sizes
    (64 * 64, 32 * 32 * 256, 16, 2),  # factor 32
]

# Config resolution: preprocessor_config.json contents -> resolved settings or an error.
CONFIG_CASES = [
    {},
    {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2},
    {"size": {"shortest_edge": 3136, "longest_edge": 12845056}},
    {"size": {"shortest_edge": 100, "longest_edge": 200000}, "min_pixels": 5000},
    {"size": {"min_pixels": 3136, "max_pixels": 50176}},
    {"size": {"min_pixels": 3136, "max_pixels": 50176}, "min_pixels": 1000, "max_pixels": 60000},
    {"size": {"min_pixels": 3136, "max_pixels": 50176}, "min_pixels": 1000},
    {"size": {"shortest_edge": 3136}},
    {"size": {"shortest_edge": 3136}, "max_pixels": 50176},
    {"size": {"longest_edge": 50176}},
    {"size": {"shortest_edge": 3136, "longest_edge": None}},
    {"size": {"shortest_edge": 3136, "longest_edge": 50176, "min_pixels": 5}},
    {"size": {"shortest_edge": 3136, "longest_edge": 50176, "max_pixels": 5}, "max_pixels": 6000},
    {"size": 3136},
    {"size": [224, 224]},
    {"size": {"height": 224, "width": 224}},
    {"min_pixels": None, "max_pixels": None, "size": None},
    {"max_pixels": 50176},
    {"min_pixels": 0},
    {"max_pixels": 0},
    {"max_pixels": 10},
    {"patch_size": 16},
    {"merge_size": 0},
    {"temporal_patch_size": 3},
    {"do_resize": False},
    {"do_rescale": False, "do_normalize": False},
    {"do_normalize": False},
    {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
]


def fresh(cls=Qwen2VLImageProcessorPil):
    """Undo the class-attribute mutation of earlier instances."""
    cls.size = copy.deepcopy(CLASS_SIZE if cls is Qwen2VLImageProcessorPil else VIDEO_CLASS_SIZE)


VIDEO_CLASS_SIZE = copy.deepcopy(Qwen2VLVideoProcessor.size)


def image_processor(min_pixels, max_pixels, **kwargs):
    fresh()
    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **kwargs)


def digest(arr):
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<f4").tobytes()).hexdigest()


def samples(arr, rng):
    flat = np.ascontiguousarray(arr, dtype="<f4").reshape(-1)
    idx = sorted({0, flat.size - 1, *rng.integers(0, flat.size, SAMPLES_PER_OUTPUT - 2).tolist()})
    return [[int(i), float(flat[i])] for i in idx]


def expected(pixel_values, grid, rng):
    return {
        "shape": list(pixel_values.shape),
        "grid_thw": [int(v) for v in grid],
        "sha256": digest(pixel_values),
        "samples": samples(pixel_values, rng),
    }


def config_cases():
    """What `from_dict` + preprocessing a 30x40 image resolves each config to."""
    img = Image.fromarray(np.full((30, 40, 3), 128, np.uint8))
    cases = []
    for cfg in CONFIG_CASES:
        fresh()
        case = {"config": cfg}
        try:
            p = Qwen2VLImageProcessorPil.from_dict(copy.deepcopy(cfg))
            out = p(img, return_tensors="np")
            case.update(
                min_pixels=int(p.size["shortest_edge"]),
                max_pixels=int(p.size["longest_edge"]),
                patch_size=int(p.patch_size),
                temporal_patch_size=int(p.temporal_patch_size),
                merge_size=int(p.merge_size),
                grid_thw_30x40=[int(v) for v in out["image_grid_thw"][0]],
                row_len=int(out["pixel_values"].shape[1]),
            )
        except Exception as e:  # noqa: BLE001 -- the refusal itself is the golden
            # HF lists the valid key sets as Python sets, whose order changes from run to run.
            case["error"] = re.sub(r"\(\{.*\}\)", "(...)", f"{type(e).__name__}: {e}")
        cases.append(case)
        print(f"config {json.dumps(cfg)} -> {case.get('error') or (case['min_pixels'], case['max_pixels'])}", file=sys.stderr)
    return cases


def image_cases(rng):
    cases = []
    for path in sorted((FIXTURES / "images").glob("*.png")):
        with Image.open(path) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
            case = {"image": f"images/{path.name}", "pil_mode": mode, "size_hw": [h, w]}
            for name, lo, hi in PIXEL_SETTINGS:
                out = image_processor(lo, hi)(im, return_tensors="np")
                case[name] = expected(out["pixel_values"], out["image_grid_thw"][0], rng)
        cases.append(case)
        print(f"image {path.name:24s} {mode:5s} {h}x{w} -> {[case[n]['grid_thw'] for n, _, _ in PIXEL_SETTINGS]}", file=sys.stderr)
    return cases


def make_frames():
    """Four 97x61 RGB frames: a smooth gradient, a moving box and a moving disc (hard edges)."""
    frames = []
    yy, xx = np.mgrid[0:61, 0:97]
    for t in range(4):
        base = np.stack([(xx * 2 + t * 17) % 256, (yy * 4 + t * 29) % 256, ((xx + yy) * 3 + 200 - t * 40) % 256], axis=-1)
        im = Image.fromarray(base.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        draw.rectangle([5 + 12 * t, 8, 30 + 12 * t, 30], fill=(255, 255, 255))
        draw.ellipse([60 - 9 * t, 30, 80 - 9 * t, 55], fill=(0, 0, 0))
        path = OUT / f"frame_{t}.png"
        im.save(path, optimize=False)
        frames.append(path)
    return frames


def composed_video(frames, lo, hi):
    """What mmreg does to a video, from HF's own functions: each frame through the PIL processor's
    `process_image` and `resize` (uint8), then the video processor's fused `rescale_and_normalize`
    and `patchify` (which pads by repeating the last frame)."""
    ip = image_processor(lo, hi)
    size = SizeDict(shortest_edge=lo, longest_edge=hi)
    factor = ip.patch_size * ip.merge_size
    arrays = [ip.resize(ip.process_image(im, do_convert_rgb=True), size=size, resample=ip.resample, factor=factor) for im in frames]
    stacked = torch.from_numpy(np.stack(arrays)[None])
    fresh(Qwen2VLVideoProcessor)
    vp = Qwen2VLVideoProcessor(size={"shortest_edge": lo, "longest_edge": hi})
    stacked = vp.rescale_and_normalize(stacked, True, ip.rescale_factor, True, ip.image_mean, ip.image_std)
    patches, t, gh, gw = vp.patchify(stacked, ip.patch_size, ip.merge_size, ip.temporal_patch_size)
    return patches[0].numpy(), [t, gh, gw]


def torchvision_video(frames, lo, hi):
    fresh(Qwen2VLVideoProcessor)
    vp = Qwen2VLVideoProcessor(size={"shortest_edge": lo, "longest_edge": hi})
    out = vp(videos=[np.stack([np.asarray(f) for f in frames])], return_tensors="np", cap_pixels_per_frame=False)
    return out["pixel_values_videos"], [int(v) for v in out["video_grid_thw"][0]]


def video_cases(frame_paths, rng):
    frames = []
    for path in frame_paths:
        with Image.open(path) as im:
            im.load()
            frames.append(im.copy())
    cases = []
    for name, lo, hi in VIDEO_SETTINGS:
        # The composition is HF's video processor itself on frames that need no resize (84x56 fits
        # both settings' rounding only for the image defaults; check there).
        if (lo, hi) == (56 * 56, 28 * 28 * 1280):
            exact = [f.crop((0, 0, 84, 56)) for f in frames[:3]]
            mine, mine_grid = composed_video(exact, lo, hi)
            theirs, theirs_grid = torchvision_video(exact, lo, hi)
            assert mine_grid == theirs_grid and np.array_equal(mine, theirs)
        for n in VIDEO_FRAME_COUNTS:
            px, grid = composed_video(frames[:n], lo, hi)
            case = {"setting": name, "min_pixels": lo, "max_pixels": hi, "frames": [f"qwen2-vl-image/{p.name}" for p in frame_paths[:n]]}
            case.update(expected(px, grid, rng))
            tv_px, tv_grid = torchvision_video(frames[:n], lo, hi)
            diff = np.abs(tv_px.astype(np.float64) - px) if tv_px.shape == px.shape else None
            case["torchvision_video_processor"] = {
                "grid_thw": tv_grid,
                "sha256": digest(tv_px),
                "max_abs_diff": None if diff is None else float(diff.max()),
                "fraction_differing": None if diff is None else float((diff > 0).mean()),
            }
            cases.append(case)
            print(f"video {name} {n} frames -> {grid}; torchvision {case['torchvision_video_processor']}", file=sys.stderr)
    return cases


def sweep():
    """(height, width) pairs: a grid of sides, seeded random pairs, extreme aspect ratios, large images."""
    sides = sorted({1, 2, 3, 5, 7, 9, 13, 14, 15, 27, 28, 29, 41, 42, 43, 55, 56, 57, 69, 70, 71, 83, 84, 85,
                    99, 100, 111, 112, 113, 127, 128, 129, 150, 199, 200, 201, 223, 224, 225, 255, 256, 300, 336,
                    337, 447, 448, 449, 500, 511, 512, 640, 700, 768, 896, 1000, 1023, 1024, 1080, 1280, 1333,
                    1500, 1792, 1920, 1999})
    rng = np.random.default_rng(20251127)
    extra = [tuple(int(v) for v in p) for p in rng.integers(1, 2000, size=(1500, 2))]
    # Near and over the 200:1 limit, within sides <= 2000.
    for short in range(1, 11):
        for long in list(range(199 * short - 2, 201 * short + 3)) + [250 * short, 1999]:
            if 1 <= long <= 1999:
                extra += [(short, long), (long, short)]
    # Large images: the floor branch with extreme ratios (where max(factor, ...) kicks in) and big photos.
    for short in [100, 101, 141, 150, 200, 257, 499]:
        for ratio in [150, 199, 200]:
            extra += [(short, short * ratio), (short * ratio, short)]
        extra += [(short, short * 200 + 1), (short * 200 + 1, short)]
    extra += [(4000, 3000), (3000, 4000), (8192, 8192), (12000, 9000), (20000, 100), (100, 20000), (99999, 500)]
    pairs = [(h, w) for h in sides for w in sides] + extra
    refusals = {}
    settings = []
    for lo, hi, patch, merge in SWEEP_SETTINGS:
        factor = patch * merge
        units = []
        for h, w in pairs:
            try:
                rh, rw = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
                assert rh % factor == 0 and rw % factor == 0 and rh > 0 and rw > 0
                units += [rh // factor, rw // factor]
            except ValueError as e:
                refusals[(h, w)] = str(e)
                units += [0, 0]
        settings.append({"min_pixels": lo, "max_pixels": hi, "patch_size": patch, "merge_size": merge, "units": units})
        print(f"sweep min {lo} max {hi} factor {factor}: {len(pairs)} pairs, {units.count(0) // 2} refused", file=sys.stderr)
    return {
        "generator": "scripts/make_qwen2_vl_image_goldens.py",
        "transformers": transformers.__version__,
        "function": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize",
        "pairs": "every (height, width) with height and width in `sides`, row-major, then `extra_pairs` (flat h, w)",
        "units": "per setting, flat (resized_height, resized_width) / factor for each pair; 0, 0 where HF refuses",
        "sides": sides,
        "extra_pairs": [v for p in extra for v in p],
        "refusals": [[h, w, msg] for (h, w), msg in sorted(refusals.items())],
        "settings": settings,
    }


def compact(obj):
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    frames = make_frames()
    goldens = {
        "generator": "scripts/make_qwen2_vl_image_goldens.py",
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "processor": "Qwen2VLImageProcessorPil(size={shortest_edge: min_pixels, longest_edge: max_pixels})",
        "video": "per frame: the PIL processor's process_image/resize; then Qwen2VLVideoProcessor.rescale_and_normalize and patchify",
        "hash": "sha256 of the float32 little-endian bytes of pixel_values [rows, C * temporal * patch * patch]",
        "samples": "[flat index into pixel_values, value]",
        "pixel_settings": [{"name": n, "min_pixels": lo, "max_pixels": hi} for n, lo, hi in PIXEL_SETTINGS],
        "configs": config_cases(),
        "images": image_cases(rng),
        "videos": video_cases(frames, rng),
    }
    (OUT / "goldens.json").write_text(compact(goldens) + "\n")
    (OUT / "smart-resize.json").write_text(json.dumps(sweep(), separators=(",", ":")) + "\n")
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1e3:.1f} kB", file=sys.stderr)


if __name__ == "__main__":
    main()
