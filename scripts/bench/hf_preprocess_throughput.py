"""HF's CLIP preprocessing throughput on every core, next to mmreg-image's (docs/preprocessing.md).

torchvision backend: batches of 12 photos per call with torch using every core (its own threading).
PIL backend: one image per call in a process pool of every core (it is single-threaded Python).
Same photos and config as the criterion benchmark: scikit-image chelsea, astronaut, coffee; LLaVA-1.5's
shortest edge 336, crop 336. Run with ~/.cache/mmreg/pydev/bin/python.
"""
import os, time
from multiprocessing import Pool

import torch
from PIL import Image
from skimage import data
from transformers import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

KW = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
PHOTOS = [Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]
BATCH = [PHOTOS[i % 3] for i in range(12)]
CORES = os.cpu_count()


def rate(fn, images_per_call, seconds=5.0):
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls * images_per_call / (time.perf_counter() - start)


_pil = None


def pil_one(i):
    global _pil
    _pil = _pil or CLIPImageProcessorPil(**KW)
    return _pil(PHOTOS[i % 3], return_tensors="np")["pixel_values"].shape


if __name__ == "__main__":
    torch.set_num_threads(CORES)
    tv = CLIPImageProcessor(**KW)
    tv_rate = rate(lambda: tv(BATCH, return_tensors="pt"), len(BATCH))
    with Pool(CORES) as pool:
        pool.map(pil_one, range(CORES * 4))
        pil_rate = rate(lambda: pool.map(pil_one, range(48)), 48)
    print(f"{CORES} cores: HF torchvision backend {tv_rate:.0f} images/s, HF PIL backend {pil_rate:.0f} images/s")
