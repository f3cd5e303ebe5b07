#!/usr/bin/env python3
"""Deterministic synthetic "shapes" data for mmreg's demo model (assets/shapes-llava, docs/demo-model.md).

Every image is a function of (split seed, index) only: ``make_sample(seed, index)`` seeds its own
``numpy.random.default_rng([seed, index])``, so any single image can be recreated without generating the others,
on any machine (integer geometry, PIL drawing + BOX downsampling, no float-order dependence on threads).

An image:
* size: width and height drawn independently, uniform integers in [48, 160] (aspect ratios up to 3.3:1), so the
  CLIP processor's resize (shortest edge -> 64, bicubic) and center crop both matter;
* background: one flat grey level in [30, 225] with a small per-channel tint (+-8);
* one shape (35%) or two shapes (65%) out of circle / square / triangle / star, each in one of six colours
  (red, green, blue, yellow, purple, orange; +-15 per-channel jitter), at distinct positions;
* positions are cells of the CENTRAL SQUARE of the image (side s = min(w, h), i.e. exactly what survives the
  CLIP center crop): top left, top right, bottom left, bottom right (cell centres at 1/4 and 3/4 of s) and
  center (1/2, 1/2), each jittered by up to +-0.03 s; shape "radius" 0.12-0.17 s. Shapes never overlap and stay
  inside the central square, so the caption is unambiguous after the crop. The bands outside the central square
  are plain background.
* drawn at 4x and downsampled with a BOX filter (anti-aliased edges).

The caption lists the shapes in reading order (top left, top right, center, bottom left, bottom right):
  "a red circle at the top left"
  "a green star in the center"
  "a red circle at the top left and a blue square at the bottom right"
  "an orange triangle at the top right"

Splits (seeds): train = 1, val = 3 (monitoring during training), heldout = 2 (final evaluation only).

Save a split on demand (PNG files ``{split}_{index:05d}.png`` + captions.json):
    ~/.cache/mmreg/pydev/bin/python scripts/shapes/data.py --split heldout --n 300 --out /tmp/shapes-heldout
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPLIT_SEEDS = {"train": 1, "heldout": 2, "val": 3}

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ["circle", "square", "triangle", "star"]
# Reading order = caption order.
POSITIONS = ["top left", "top right", "center", "bottom left", "bottom right"]
CELL = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "center": (0.5, 0.5),
        "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75)}
PHRASE = {"top left": "at the top left", "top right": "at the top right", "center": "in the center",
          "bottom left": "at the bottom left", "bottom right": "at the bottom right"}
# Bounding-circle radius of each shape, in units of its nominal radius r.
EXTENT = {"circle": 1.0, "square": 0.85 * math.sqrt(2.0), "triangle": 1.1, "star": 1.15}

MIN_SIDE, MAX_SIDE = 48, 160
SUPERSAMPLE = 4
P_TWO = 0.65


def caption_words() -> list[str]:
    """Every word a caption can contain, in a fixed order (the tokenizer's caption vocabulary)."""
    words = ["a", "an", "and", "at", "the", "in"]
    words += list(COLOURS) + SHAPES
    for p in POSITIONS:
        for w in PHRASE[p].split():
            if w not in words:
                words.append(w)
    return words


def caption_of(objects: list[dict]) -> str:
    objs = sorted(objects, key=lambda o: POSITIONS.index(o["position"]))
    return " and ".join(f"{article(o['colour'])} {o['colour']} {o['shape']} {PHRASE[o['position']]}" for o in objs)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.1 * r
        return [(cx + R * math.cos(math.radians(a)), cy + R * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "star":
        R, ri = 1.15 * r, 0.45 * 1.15 * r
        pts = []
        for k in range(10):
            a = math.radians(-90 + 36 * k)
            rr = R if k % 2 == 0 else ri
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(shape)


def make_sample(seed: int, index: int) -> tuple[Image.Image, str, dict]:
    """(RGB PIL image, caption, spec) for sample ``index`` of the split with ``seed``."""
    rng = np.random.default_rng([seed, index])
    w = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    h = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    s = min(w, h)
    ox, oy = (w - s) / 2.0, (h - s) / 2.0
    grey = int(rng.integers(30, 226))
    bg = tuple(int(np.clip(grey + rng.integers(-8, 9), 0, 255)) for _ in range(3))

    n = 2 if rng.random() < P_TWO else 1
    positions = [POSITIONS[i] for i in sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())]
    objects = []
    for pos in positions:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        base = COLOURS[colour]
        rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in base)
        objects.append({"position": pos, "colour": colour, "shape": shape, "rgb": rgb})
    # Geometry (fractions of s), resampled until the shapes' bounding circles keep a gap.
    while True:
        for o in objects:
            cx0, cy0 = CELL[o["position"]]
            o["cx"] = cx0 + float(rng.uniform(-0.03, 0.03))
            o["cy"] = cy0 + float(rng.uniform(-0.03, 0.03))
            o["r"] = float(rng.uniform(0.12, 0.17))
        if n == 1:
            break
        a, b = objects
        d = math.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"])
        if d >= a["r"] * EXTENT[a["shape"]] + b["r"] * EXTENT[b["shape"]] + 0.03:
            break

    S = SUPERSAMPLE
    img = Image.new("RGB", (w * S, h * S), bg)
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r = (ox + o["cx"] * s) * S, (oy + o["cy"] * s) * S, o["r"] * s * S
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o["rgb"])
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r), fill=o["rgb"])
    img = img.resize((w, h), Image.Resampling.BOX)
    spec = {"seed": seed, "index": index, "width": w, "height": h, "background": list(bg),
            "objects": [{k: (list(v) if isinstance(v, tuple) else (round(v, 4) if isinstance(v, float) else v))
                         for k, v in o.items()} for o in objects]}
    return img, caption_of(objects), spec


def split(name: str, n: int, start: int = 0):
    """Yield (index, image, caption) for ``n`` samples of split ``name`` from ``start``."""
    seed = SPLIT_SEEDS[name]
    for i in range(start, start + n):
        img, cap, _ = make_sample(seed, i)
        yield i, img, cap


def file_name(name: str, index: int) -> str:
    return f"{name}_{index:05d}.png"


def save_split(name: str, n: int, out: Path, start: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i, img, cap in split(name, n, start):
        f = file_name(name, i)
        img.save(out / f, format="PNG", optimize=True)
        captions[f] = cap
    (out / "captions.json").write_text(json.dumps(captions, indent=2) + "\n", encoding="utf-8")
    return captions


def main():
    ap = argparse.ArgumentParser(description="Write a split of the synthetic shapes data as PNG files.")
    ap.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="heldout")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    caps = save_split(a.split, a.n, Path(a.out), a.start)
    print(f"wrote {len(caps)} images + captions.json to {a.out}")


if __name__ == "__main__":
    main()
