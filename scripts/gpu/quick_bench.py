"""A short GPU check (about 3 minutes on an H200): mmreg alone, as it runs by default (fused kernels on), on
the LLaVA-1.5-7B- and LLaVA-NeXT-Mistral-7B-shaped checkpoints: prefill, embeddings, TTFT and decode at the
batches of bench_common.SHAPES, and the batch-1 decode floor measured on the card. No HF side: compare with
a full `bench.py` run on the same card type.
Usage on the GPU machine: python3 scripts/gpu/quick_bench.py gpu-stage/run.sh
MODELS=LLaVA-1.5-7B (names of bench_common.SHAPES, comma-separated) picks the models; BATCHES=4,8,16 the
batch sizes (default: each model's in SHAPES).
With AB=1, each model also runs with the fused kernels off (libtorch's ops), in the same call.
With VARIANTS="ENV=VALUE[,ENV=VALUE]|..." each model also runs with each variant's environment (say
VARIANTS="MMREG_LINEAR_PREFETCH_RUNS=16|MMREG_LINEAR_PREFETCH_RUNS=64"), the default and the variants
alternating REPEAT times (default 2), so that each is measured against the default in one call. A variant's
ARGS are flags of `mmreg bench` instead (VARIANTS="ARGS=--no-enable-chunked-prefill").
With ANCHOR=1, the compiled-PyTorch anchor (gpt-fast's recipe, staged by gpu-stage.sh) runs after mmreg
on LLaVA-1.5-7B's decoder, prompt and batches (several more minutes: it compiles once per batch size);
and again with its decode position kept on the device, as gpt-fast's loop keeps it
(scripts/gpu/anchor_device_pos.py: the peer at its strongest, runs 112-113; ANCHOR_DEVICE_POS=0: not).
With BEFORE=1, each model also runs the staged `gpu-stage/mmreg-before` (a build of an earlier commit),
alternating before/after REPEAT times, so that a change is measured against its base on the same card in
one call.
The raw JSON of every run, with each peer's label, goes to $OUT/quick-bench.json when OUT is set.
"""
import functools, os, sys

import torch

sys.path.insert(0, "scripts/gpu")
from bench_common import SHAPES, anchor, floor, mmreg_bench, print_table, record, write_json  # noqa: E402

AB = os.environ.get("AB") == "1"
ANCHOR = os.environ.get("ANCHOR") == "1"
BEFORE = os.environ.get("BEFORE") == "1"
REPEAT = int(os.environ.get("REPEAT", "2"))
MODELS = os.environ.get("MODELS")
VARIANTS = [dict(kv.split("=", 1) for kv in v.split(",")) for v in os.environ.get("VARIANTS", "").split("|") if v]
result = record("quick-bench")

for shape in SHAPES:
    if MODELS and shape.name not in MODELS.split(","):
        continue
    model = shape.make(shape.path)
    rec = result["models"][shape.name] = {"prompt": shape.prompt, "image": shape.image, "floor": floor(model)}
    del model
    torch.cuda.empty_cache()
    batches = os.environ.get("BATCHES", shape.batches)
    run = functools.partial(mmreg_bench, shape.path, shape.prompt, shape.image, batches)
    if BEFORE:
        # Each binary as it runs by default (the fused kernels on).
        rec["peers"] = [dict(run(binary=binary, fused=True), rep=rep) for rep in range(REPEAT)
                        for binary in ["mmreg-before", "mmreg"]]
        for p in rec["peers"]:
            p["label"] += f" #{p['rep'] + 1}"
    elif VARIANTS:
        rec["peers"] = [dict(run(fused=True, env_extra=env or None), rep=rep) for rep in range(REPEAT)
                        for env in [{}] + VARIANTS]
        for p in rec["peers"]:
            p["label"] += f" #{p['rep'] + 1}"
    else:
        rec["peers"] = [run(fused=True)] + ([run()] if AB else [])
    print_table(f"{result['gpu']}, commit {result['commit']}: {shape.name} shapes", rec["peers"])
    write_json("quick-bench.json", result)

if ANCHOR and SHAPES[0].name in result["models"]:
    rec = result["models"][SHAPES[0].name]
    prompt_tokens = rec["peers"][-1]["result"]["prompt_tokens"]
    for device_pos in [False] + ([True] if os.environ.get("ANCHOR_DEVICE_POS") != "0" else []):
        peer = anchor(prompt_tokens, SHAPES[0].batches, device_pos)
        if peer:
            rec["peers"].append(peer)
            print_table(f"{result['gpu']}: {SHAPES[0].name} decoder, decode", rec["peers"])
            write_json("quick-bench.json", result)
