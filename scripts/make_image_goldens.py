#!/usr/bin/env python3
"""Writes the image fixtures and HF reference hashes that mmreg-image/tests/hf_parity.rs checks.

Run with the dev venv (transformers 5.17, Pillow >= 13, numpy, scikit-image):

    ~/.cache/mmreg/pydev/bin/python scripts/make_image_goldens.py

Outputs (relative to the repository root):
  fixtures/images/*.png        test images (skimage photos + seeded synthetic images, all PNG)
  fixtures/image-goldens.json  per image and processor: output shape, sha256 of HF's float32
                               little-endian pixel bytes, sampled values, NeXT image_sizes

The references come from transformers' PIL backend (`CLIPImageProcessorPil`,
`LlavaNextImageProcessorPil`) configured from fixtures/configs/*/preprocessor_config.json (the
llava-hf hub configs). Raw tensors are not stored: a hash plus samples is enough to detect and
locate a mismatch.
"""

import hashlib
import io
import json
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image
from skimage import data as skdata
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
IMAGES = FIXTURES / "images"
CONFIGS = {"clip": FIXTURES / "configs" / "llava-1.5", "llava_next": FIXTURES / "configs" / "llava-v1.6"}
SAMPLES_PER_OUTPUT = 12


def smooth_rgb(rng, height, width, channels=3, levels=256, cell=40):
    """Random but smooth content: a bilinearly upsampled coarse grid plus a few hard-edged boxes.

    The boxes (pure 0 / 255 edges) make the bicubic kernel overshoot, exercising the clamp.
    `levels` < 256 quantises the smooth part so large images stay small as PNG.
    """
    gh, gw = max(2, height // cell + 2), max(2, width // cell + 2)
    grid = rng.uniform(0, 255, size=(gh, gw, channels))
    ys = np.linspace(0, gh - 1, height)
    xs = np.linspace(0, gw - 1, width)
    y0 = np.minimum(ys.astype(int), gh - 2)
    x0 = np.minimum(xs.astype(int), gw - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    img = top * (1 - fy) + bottom * fy
    step = 256 // levels
    img = (np.floor(img / step) * step).clip(0, 255)
    for _ in range(3):
        bh, bw = rng.integers(1, max(2, height // 3)), rng.integers(1, max(2, width // 3))
        y, x = rng.integers(0, height - bh + 1), rng.integers(0, width - bw + 1)
        img[y : y + bh, x : x + bw] = rng.choice([0.0, 255.0], size=channels)
    return img.astype(np.uint8)


def write_png_16(path, arr, color_type):
    """Minimal PNG writer for 16-bit images (PIL cannot save 16-bit RGB)."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, payload):
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
    )


def make_images():
    """Creates every fixture image; returns {name: short description}."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240607)
    made = {}

    def save(name, img, note):
        img.save(IMAGES / f"{name}.png", optimize=True)
        made[name] = note

    for name in ["chelsea", "astronaut", "coffee"]:
        save(name, Image.fromarray(getattr(skdata, name)()), "scikit-image photo")

    # (height, width), chosen to hit each branch: Pillow 13 vertical-first (h > 2w, w > 336),
    # upscaling, exact 336, odd sizes, tiny inputs, and the NeXT worked examples of the spec.
    shapes = {
        "tall_vfirst_1000x450": (1000, 450),
        "tall_up_700x300": (700, 300),
        "wide_300x800": (300, 800),
        "square_500x500": (500, 500),
        "upscale_200x150": (200, 150),
        "exact_336x336": (336, 336),
        "odd_337x500": (337, 500),
        "odd_500x337": (500, 337),
        "tiny_5x7": (5, 7),
        "tiny_7x5": (7, 5),
        "tiny_2x4": (2, 4),
        "next_480x640": (480, 640),
        "next_500x316": (500, 316),
        "next_100x1000": (100, 1000),
        "next_1080x1920": (1080, 1920),
        "next_1920x1080": (1920, 1080),
    }
    for name, (h, w) in shapes.items():
        # Large images are quantised and coarser so the fixtures stay small (PNG compresses plateaus).
        levels, cell = (256, 40) if h * w <= 120_000 else (32, 60) if h * w <= 400_000 else (8, 120)
        save(name, Image.fromarray(smooth_rgb(rng, h, w, levels=levels, cell=cell)), f"synthetic RGB {h}x{w}")

    gray = smooth_rgb(rng, 240, 320, channels=1)[..., 0]
    save("mode_L", Image.fromarray(gray, mode="L"), "8-bit gray")
    la = np.dstack([gray, smooth_rgb(rng, 240, 320, channels=1)[..., 0]])
    save("mode_LA", Image.fromarray(la, mode="LA"), "8-bit gray + alpha")
    rgba = np.dstack([smooth_rgb(rng, 250, 410), smooth_rgb(rng, 250, 410, channels=1)])
    save("mode_RGBA", Image.fromarray(rgba, mode="RGBA"), "8-bit RGBA (alpha dropped)")
    pal = Image.fromarray(smooth_rgb(rng, 230, 300)).quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    save("mode_P", pal, "palette PNG")
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    save("mode_P_trns", pal_t, "palette PNG with a transparent index")
    save("mode_1", Image.fromarray(gray > 128).convert("1"), "1-bit gray")

    gray16 = (smooth_rgb(rng, 260, 300, channels=1)[..., 0].astype(np.uint16) * 3)  # 0..765: clipping matters
    write_png_16(IMAGES / "mode_I16.png", gray16, color_type=0)
    made["mode_I16"] = "16-bit gray (PIL I;16, clipped to 255)"
    # Low bytes vary too, so dropping them (not rounding) is what the hash checks.
    low = ((np.arange(300)[None, :, None] // 16) * 37 + (np.arange(260)[:, None, None] // 16) * 11 + np.arange(3)) % 256
    rgb16 = smooth_rgb(rng, 260, 300, levels=64).astype(np.uint16) * 256 + low.astype(np.uint16)
    write_png_16(IMAGES / "mode_RGB16.png", rgb16, color_type=2)
    made["mode_RGB16"] = "16-bit RGB (PIL keeps the high byte)"
    return made


def digest(arr):
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<f4").tobytes()).hexdigest()


def plane_sums(arr):
    """float64 sum of every [tile, channel] plane, to locate a mismatch without storing pixels."""
    planes = np.asarray(arr, dtype=np.float64).reshape(-1, arr.shape[-2] * arr.shape[-1])
    return [float(v) for v in planes.sum(axis=1)]


def samples(arr, rng):
    """A few (flat index, value) pairs: first, last and random positions."""
    flat = np.ascontiguousarray(arr, dtype="<f4").reshape(-1)
    idx = sorted({0, flat.size - 1, *rng.integers(0, flat.size, SAMPLES_PER_OUTPUT - 2).tolist()})
    return [[int(i), float(flat[i])] for i in idx]


def main():
    made = make_images()
    clip = CLIPImageProcessorPil.from_pretrained(CONFIGS["clip"])
    nxt = LlavaNextImageProcessorPil.from_pretrained(CONFIGS["llava_next"])
    rng = np.random.default_rng(7)
    cases = []
    for name in sorted(made):
        path = IMAGES / f"{name}.png"
        with Image.open(path) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
            clip_px = clip(im, return_tensors="np")["pixel_values"][0]
            out = nxt(im, return_tensors="np")
            next_px = out["pixel_values"][0]
            image_size = [int(v) for v in out["image_sizes"][0]]
        cases.append(
            {
                "image": f"images/{name}.png",
                "note": made[name],
                "pil_mode": mode,
                "size_hw": [h, w],
                "clip": {
                    "shape": list(clip_px.shape),
                    "sha256": digest(clip_px),
                    "plane_sums": plane_sums(clip_px),
                    "samples": samples(clip_px, rng),
                },
                "llava_next": {
                    "shape": list(next_px.shape),
                    "sha256": digest(next_px),
                    "plane_sums": plane_sums(next_px),
                    "samples": samples(next_px, rng),
                    "image_size": image_size,
                    "num_patches": int(next_px.shape[0]),
                },
            }
        )
        print(f"{name:24s} {mode:5s} {h}x{w} clip {clip_px.shape} next {next_px.shape}", file=sys.stderr)

    goldens = {
        "generator": "scripts/make_image_goldens.py",
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "processors": {
            "clip": "CLIPImageProcessorPil from configs/llava-1.5/preprocessor_config.json",
            "llava_next": "LlavaNextImageProcessorPil from configs/llava-v1.6/preprocessor_config.json",
        },
        "hash": "sha256 of the float32 little-endian bytes of one image's pixel_values ([3,H,W] or [P,3,H,W])",
        "plane_sums": "float64 sum of each [tile, channel] plane, in order",
        "samples": "[flat index into that array, value]",
        "cases": cases,
    }
    text = json.dumps(goldens, indent=1)
    # Keep short lists of numbers on one line so the file stays readable.
    text = re.sub(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    (FIXTURES / "image-goldens.json").write_text(text + "\n")
    total = sum(p.stat().st_size for p in IMAGES.glob("*.png"))
    print(f"wrote {len(cases)} cases; images total {total / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
