#!/usr/bin/env python3
"""Make an HF-transformers golden for a LONG multimodal prompt (> 8192 tokens) on fixtures/llava-next-tiny-real/.

The prompt "[INST] <image>\\n<image>\\n<image>\\nDescribe the three images. [/INST]" with three synthetic images
expands (HF's <image> expansion, 2928 + 2736 + 2830 image tokens) to more than 8192 tokens, so a prefill that works
in chunks of <= 8192 tokens must cross at least one chunk boundary, and the boundary falls inside an image.
It reuses the existing checkpoint of fixtures/llava-next-tiny-real/ (made by scripts/make_llava_next_fixtures.py)
and the conventions of that script: HF eager attention, float32 compute (the BF16 checkpoint loaded with
dtype=torch.float32), CPU, torch.set_num_threads(1), AutoProcessor.from_pretrained(dir, backend="pil").

What it writes:
* ``fixtures/llava-next-tiny-real/images/long_{h}x{w}.png`` -- three smooth synthetic PNGs (h x w), made with
  make_llava_fixtures.synth_image(h, w, k) with new k (3, 7, 6; the existing images use 0, 1, 2), saved like the
  other fixture images (PNG, compress_level 9). Sizes (672,672), (700,650), (660,690): all pick the 672x672
  pinpoint (5 patches) and differ in their unpadded grid.
* ``fixtures/llava-next-tiny-real/chunked_prefill_golden.json`` -- prompt, images (size, png sha256, anyres
  geometry), prompt_ids (before expansion), input_ids (after expansion, the full list), per-image <image> counts
  and spans, image_sizes, the 20 greedy new tokens of
  ``generate(**inputs, do_sample=False, max_new_tokens=20, eos_token_id=None)``, the top-5 ids/logits at the last
  prompt position (prefill), the top-2 ids/logits of each generation step (to judge near-ties), and the checks.

Self-checks (the script aborts if one fails): input_ids = prompt ids with each <image> repeated N times (N = the
processor's and the model's count); the forward's last-position logits equal generate()'s first-step logits; the
generated tokens equal a manual no-cache argmax loop over the merged prompt embeddings (eager); SDPA agrees with
eager at the last position.

Run (from the repo root), e.g. with a venv holding the versions recorded in the JSON:
    /work/venv-hf/bin/python scripts/make_chunked_prefill_golden.py [--out fixtures] [--no-manual-check]
Deterministic: a rerun gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tokenizers
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_llava_fixtures as base  # noqa: E402  (synth_image, versions, dump_json, sha256)
import make_llava_next_fixtures as nxt  # noqa: E402  (anyres_geometry, image_spans, merged_embeds, manual_greedy)

FIXTURE = "llava-next-tiny-real"
PROMPT = "[INST] <image>\n<image>\n<image>\nDescribe the three images. [/INST]"
IMAGE_TOKEN = nxt.IMAGE_TOKEN
MAX_NEW_TOKENS = base.MAX_NEW_TOKENS  # 20
CHUNK = 8192  # the expanded prompt must be longer than this
MAX_POSITIONS = 32768  # text_config.max_position_embeddings
# file -> (h, w, k of synth_image); k 0..2 are taken by the other llava-next-tiny-real images
IMAGES = {
    "long_672x672.png": (672, 672, 3),
    "long_700x650.png": (700, 650, 7),
    "long_660x690.png": (660, 690, 6),
}
TOPK = 5
MIN_DISTINCT_GENERATED = 5


def topk(row: torch.Tensor, k: int) -> dict:
    v, i = torch.topk(row.float(), k)
    return {"ids": i.tolist(), "logits": [float(x) for x in v]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(base.REPO / "fixtures"), help="fixtures directory (default: repo fixtures/)")
    ap.add_argument("--no-manual-check", action="store_true", help="skip the manual no-cache greedy loop (slow)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = Path(args.out) / FIXTURE
    img_dir = path / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    print("versions:", base.versions())

    images, files = [], list(IMAGES)
    for fname, (h, w, k) in IMAGES.items():
        base.synth_image(h, w, k).save(img_dir / fname, format="PNG", optimize=False, compress_level=9)
        im = Image.open(img_dir / fname).convert("RGB")
        im.load()
        assert im.size == (w, h)
        images.append(im)

    processor = AutoProcessor.from_pretrained(str(path), backend="pil")
    assert type(processor).__name__ == "LlavaNextProcessor", type(processor)
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil", type(processor.image_processor)
    assert type(processor.tokenizer).__name__ == "TokenizersBackend", type(processor.tokenizer)
    assert processor.image_token_id == IMAGE_TOKEN

    geo = {f: nxt.anyres_geometry(h, w, processor) for f, (h, w, _) in IMAGES.items()}
    counts = [geo[f]["num_image_tokens"] for f in files]

    inputs = processor(text=PROMPT, images=images, return_tensors="pt")
    ids = inputs.input_ids[0].tolist()
    prompt_ids = processor.tokenizer(PROMPT).input_ids
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")).encode(PROMPT)
    assert prompt_ids == raw.ids, (prompt_ids, raw.ids)
    spans = nxt.image_spans(ids, IMAGE_TOKEN)
    assert [e - s + 1 for s, e in spans] == counts, (spans, counts)
    exp_ids, j = [], 0
    for t in prompt_ids:
        if t == IMAGE_TOKEN:
            exp_ids += [IMAGE_TOKEN] * counts[j]
            j += 1
        else:
            exp_ids.append(t)
    assert ids == exp_ids
    L = len(ids)
    assert CHUNK < L < MAX_POSITIONS, L
    assert inputs.image_sizes.tolist() == [[h, w] for h, w, _ in IMAGES.values()]
    print(f"[prompt] {len(prompt_ids)} ids -> {L} after expansion; image tokens {counts}; spans {spans}")

    model = LlavaNextForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    feed = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes)
    with torch.no_grad():
        last = model(**feed, logits_to_keep=1).logits[0, -1]  # prefill logits at the last prompt position
        gen = model.generate(**feed, attention_mask=inputs.attention_mask, do_sample=False,
                             max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    new = gen.sequences[0, L:].tolist()
    assert len(new) == MAX_NEW_TOKENS and gen.sequences[0, :L].tolist() == ids
    step_logits = [s[0] for s in gen.logits]
    assert [int(s.argmax()) for s in step_logits] == new
    first_step_diff = float((step_logits[0] - last).abs().max())
    assert first_step_diff == 0.0, first_step_diff  # same prefill graph: bit-identical expected
    assert len(set(new)) >= MIN_DISTINCT_GENERATED, new
    print(f"[generate] {new}")

    checks = {"generate_first_step_logits_equal_forward_last_position": True}
    sdpa = LlavaNextForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                             attn_implementation="sdpa").eval()
    with torch.no_grad():
        last_sdpa = sdpa(**feed, logits_to_keep=1).logits[0, -1]
    d = float((last_sdpa - last).abs().max())
    assert d < 1e-4, d
    checks["sdpa_vs_eager_last_position_max_abs_diff"] = d
    del sdpa
    if not args.no_manual_check:
        embeds = nxt.merged_embeds(model, inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
        assert embeds.shape == (1, L, model.config.text_config.hidden_size)
        manual = nxt.manual_greedy(model, embeds, MAX_NEW_TOKENS)
        assert manual == new, (manual, new)
        checks["generate_equals_manual_no_cache_greedy_eager"] = True
        print("[check] manual no-cache greedy (eager) == generate()")
    else:
        checks["generate_equals_manual_no_cache_greedy_eager"] = "skipped (--no-manual-check)"

    step_top2 = [topk(s, 2) for s in step_logits]
    meta = {
        "fixture": FIXTURE,
        "made_by": "scripts/make_chunked_prefill_golden.py",
        "versions": base.versions(),
        "purpose": "long multimodal prompt (> %d tokens after <image> expansion) for chunked-prefill tests" % CHUNK,
        "attn_implementation": "eager (sdpa only for the cross-check)",
        "dtype": "float32 compute; checkpoint stored bf16 and loaded with dtype=torch.float32; CPU",
        "processor": "AutoProcessor.from_pretrained(dir, backend='pil') = LlavaNextProcessor("
                     "LlavaNextImageProcessorPil, %s)" % type(processor.tokenizer).__name__,
        "eos_disabled_by": "generate(..., eos_token_id=None) kwarg (a GenerationConfig with eos_token_id=None does "
                           "not disable EOS in transformers 5.17); checked against a manual no-cache argmax loop",
        "generate_call": "generate(input_ids, pixel_values, image_sizes, attention_mask, do_sample=False, "
                         "max_new_tokens=%d, eos_token_id=None)" % MAX_NEW_TOKENS,
        "prompt": PROMPT,
        "images": [{"file": f, "size_hw": [h, w], "synth_image_k": k, "png_sha256": base.sha256(img_dir / f),
                    "png_bytes": (img_dir / f).stat().st_size,
                    **{kk: v for kk, v in geo[f].items() if kk != "size_hw"}}
                   for f, (h, w, k) in IMAGES.items()],
        "image_sizes": inputs.image_sizes.tolist(),
        "pixel_values_shape": list(inputs.pixel_values.shape),
        "pixel_values_sha256": nxt.f32_sha256(inputs.pixel_values),
        "num_prompt_ids": len(prompt_ids),
        "num_input_ids": L,
        "image_token_counts": counts,
        "image_token_spans": [[s, e] for s, e in spans],
        "checks": checks,
        "generated_token_ids": new,
        "last_position": L - 1,
        "last_position_top5": topk(last, TOPK),
        "generated_step_top2": {"note": "top-2 ids/logits of generate()'s raw logits at each of the 20 steps "
                                        "(step 0 = last prompt position); the margin shows how close a flip is",
                                "ids": [s["ids"] for s in step_top2], "logits": [s["logits"] for s in step_top2]},
        "prompt_ids": prompt_ids,
        "input_ids": ids,
    }
    out = path / "chunked_prefill_golden.json"
    # compact: one line per top-level key (input_ids is one long line)
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False, separators=(',', ':'))}"
                               for k, v in meta.items()) + "\n}\n"
    assert json.loads(text) == json.loads(json.dumps(meta))
    out.write_text(text, encoding="utf-8")
    print(f"[written] {out} ({out.stat().st_size} bytes); last top5 {meta['last_position_top5']}")


if __name__ == "__main__":
    main()
