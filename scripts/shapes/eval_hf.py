#!/usr/bin/env python3
"""Held-out exact-match accuracy of the shapes demo model with HF transformers, and goldens for mmreg.

* Regenerates the held-out split (scripts/shapes/data.py, seed 2, indices 0..N-1), writes it as PNGs to a temp dir
  and reads them back (PNG is lossless: the pixels are the generator's), then for every image runs HF greedy
  generation exactly as ``mmreg generate`` does: AutoProcessor.from_pretrained(model, backend="pil") on
  (image, PROMPT), LlavaForConditionalGeneration in float32 with eager attention, batch 1,
  generate(do_sample=False, max_new_tokens=24) stopping at </s> (config eos_token_id 2), decode with
  skip_special_tokens=True. Exact match = decoded text == true caption.
* Cross-check: the same with sdpa attention must give the same token ids (reported).
* Goldens: the first G held-out images (default 40) are copied to ``<model>/eval/heldout_XXXXX.png`` and
  recorded in ``<model>/goldens.json`` with the prompt, its ids, HF's generated ids (including the final </s>,
  as mmreg's Generation.token_ids) and text, and the true caption. The images can also be recreated with
  ``data.make_sample(2, index)`` or ``scripts/shapes/data.py --split heldout --n 40 --out DIR``.
* The same for the demo images in ``<model>/samples/`` (key "samples" of goldens.json).
* Writes ``<model>/eval_hf.json`` (accuracy, confusions, versions).

Run (from the repo root):
    ~/.cache/mmreg/pydev/bin/python scripts/shapes/eval_hf.py [--model assets/shapes-llava] [--n 500] [--goldens 40]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import tokenizers
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessorPil, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
from train import EOS_ID, MAX_NEW_TOKENS, PROMPT  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def load(model_dir: Path, attn: str):
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32,
                                                          attn_implementation=attn).eval()
    return model


@torch.no_grad()
def greedy(model, enc) -> list[int]:
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         pixel_values=enc["pixel_values"], do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "assets" / "shapes-llava"))
    ap.add_argument("--n", type=int, default=500, help="held-out images (indices 0..n-1 of seed 2)")
    ap.add_argument("--goldens", type=int, default=40, help="how many of them become goldens (first G)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model_dir = Path(a.model)

    proc = AutoProcessor.from_pretrained(str(model_dir), backend="pil")
    assert type(proc.image_processor) is CLIPImageProcessorPil, type(proc.image_processor)
    eager, sdpa = load(model_dir, "eager"), load(model_dir, "sdpa")
    assert eager.generation_config.eos_token_id == EOS_ID, eager.generation_config.eos_token_id
    raw_tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt_ids = raw_tok.encode(PROMPT).ids  # what the Rust tokenizers crate gives (add_special_tokens=true)
    assert proc.tokenizer(PROMPT).input_ids == prompt_ids

    rows, n_ok, n_sdpa_same = [], 0, 0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        captions = data.save_split("heldout", a.n, Path(tmp))
        for f, cap in captions.items():
            idx = int(f.split("_")[1].split(".")[0])
            img = Image.open(Path(tmp) / f)
            img.load()
            enc = proc(images=[img], text=PROMPT, return_tensors="pt")
            ids = greedy(eager, enc)
            ids_sdpa = greedy(sdpa, enc)
            text = proc.tokenizer.decode(ids, skip_special_tokens=True)
            assert text == raw_tok.decode(ids, skip_special_tokens=True)
            ok = text == cap
            n_ok += ok
            n_sdpa_same += ids == ids_sdpa
            rows.append({"file": f, "index": idx, "width": img.width, "height": img.height, "true_caption": cap,
                         "generated_ids": ids, "generated_text": text, "exact_match": ok,
                         "input_len": int(enc["input_ids"].shape[1])})
        t_gen = time.time() - t0
        acc = n_ok / len(rows)
        print(f"held-out exact match (HF eager f32 greedy): {n_ok}/{len(rows)} = {acc:.4f}; "
              f"sdpa same ids: {n_sdpa_same}/{len(rows)}; {t_gen:.0f}s")
        for r in rows:
            if not r["exact_match"]:
                print(f"  MISS {r['file']} {r['width']}x{r['height']}: got {r['generated_text']!r} "
                      f"want {r['true_caption']!r}")

        eval_dir = model_dir / "eval"
        if eval_dir.exists():
            shutil.rmtree(eval_dir)
        eval_dir.mkdir()
        goldens = []
        for r in rows[:a.goldens]:
            shutil.copyfile(Path(tmp) / r["file"], eval_dir / r["file"])
            goldens.append({"image": f"eval/{r['file']}", "split": "heldout", "seed": data.SPLIT_SEEDS["heldout"],
                            "index": r["index"], "width": r["width"], "height": r["height"], "prompt": PROMPT,
                            "generated_ids": r["generated_ids"], "generated_text": r["generated_text"],
                            "true_caption": r["true_caption"], "exact_match": r["exact_match"]})

    samples = []  # the demo images of <model>/samples (written by train.py), same procedure
    sample_caps = json.loads((model_dir / "samples" / "captions.json").read_text(encoding="utf-8"))
    for f, cap in sample_caps.items():
        img = Image.open(model_dir / "samples" / f)
        img.load()
        ids = greedy(eager, proc(images=[img], text=PROMPT, return_tensors="pt"))
        text = proc.tokenizer.decode(ids, skip_special_tokens=True)
        samples.append({"image": f"samples/{f}", "width": img.width, "height": img.height, "prompt": PROMPT,
                        "generated_ids": ids, "generated_text": text, "true_caption": cap,
                        "exact_match": text == cap})
        print(f"sample {f}: {text!r} {'OK' if text == cap else 'MISS, want ' + repr(cap)}")

    versions = {"transformers": transformers.__version__, "torch": torch.__version__,
                "tokenizers": tokenizers.__version__, "PIL": PIL.__version__, "numpy": np.__version__}
    meta = {
        "made_by": "scripts/shapes/eval_hf.py",
        "how": "HF LlavaForConditionalGeneration f32, eager attention, CPU 1 thread, batch 1; "
               "AutoProcessor.from_pretrained(model, backend='pil'); generate(do_sample=False, "
               f"max_new_tokens={MAX_NEW_TOKENS}) stopping at eos_token_id {EOS_ID} (the stop token is the last "
               "generated id); text = tokenizer.decode(generated_ids, skip_special_tokens=True)",
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "input_len": rows[0]["input_len"],
        "recreate_images": "data.make_sample(seed=2, index) in scripts/shapes/data.py, or: "
                           "scripts/shapes/data.py --split heldout --n 40 --out DIR",
        "versions": versions,
        "goldens": goldens,
        "samples": samples,
    }
    (model_dir / "goldens.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    report = {"heldout_images": len(rows), "exact_match": n_ok, "accuracy": acc,
              "sdpa_same_ids": n_sdpa_same, "prompt": PROMPT, "versions": versions,
              "misses": [{k: r[k] for k in ("file", "width", "height", "generated_text", "true_caption")}
                         for r in rows if not r["exact_match"]]}
    (model_dir / "eval_hf.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {model_dir / 'goldens.json'} ({len(goldens)} goldens) and {model_dir / 'eval_hf.json'}")


if __name__ == "__main__":
    main()
