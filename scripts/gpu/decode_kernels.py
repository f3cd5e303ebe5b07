"""Issue #18, the kernels of our own at decode, in one device call: on the LLaVA-1.5-7B and
LLaVA-NeXT-Mistral-7B shapes, mmreg with its defaults (fused kernels on) and with them off
(MMREG_FUSED_KERNELS=0: libtorch's ops), at bench_common.SHAPES' batches; also the decode attention split
by a target of blocks (MMREG_DECODE_ATTENTION_BLOCKS, see BLOCKS below) and, on LLaVA-1.5, traces of the
default run; bf16 agreement with HF by vLLM's top-5 rule at every one of 32 teacher-forced steps for both; the
compiled-PyTorch anchor on LLaVA-1.5's decoder and prompt, right after LLaVA-1.5. Raw JSON to
$OUT/decode-kernels.json, written after each measurement.
Usage: python3 scripts/gpu/decode_kernels.py gpu-stage/run.sh   (decode_kernels.sh runs the GPU tests first)
Switches: OFF=0 skips the libtorch-ops runs; BLOCKS=1024,2048 sets the attention block targets tried
beside the default split (by occupancy) on LLaVA-1.5 at batches 8 and 32 (default 4096; empty: none), and
BLOCKS_NEXT the same on LLaVA-NeXT at batch 8 (default: none). VARIANTS="A=1,B=2;C=0" runs mmreg once more
for each ;-separated set of environment variables, on LLaVA-1.5 at VARIANT_BATCHES (default 1,8,32), and
VARIANTS_NEXT on LLaVA-NeXT at VARIANT_BATCHES_NEXT (default 1,8); AGREEMENT=0 and ANCHOR=0 skip the
agreement checks and the anchor (a short comparison of variants); a variant also named in TRACED is traced
(decode at batches 1 and 8 summarised), and TRACE_NEXT=1 traces LLaVA-NeXT's default run as LLaVA-1.5's is.
MODELS=next,llava15 picks the models and their order (default llava15,next).
"""
import os, subprocess, sys

import torch

sys.path.insert(0, "scripts/gpu")
from bench_common import (SHAPES, agreement, anchor, floor, hf_greedy, hf_inputs, mmreg_bench,  # noqa: E402
                          print_table, record, write_json)

TRACE = "/tmp/trace-fused"
result = record("decode-kernels")
NAMES = {"llava15": SHAPES[0], "next": SHAPES[1]}
for shape in [NAMES[m] for m in os.environ.get("MODELS", "llava15,next").split(",")]:
    first = shape is SHAPES[0]
    model = shape.make(shape.path)
    rec = result["models"][shape.name] = {"prompt": shape.prompt, "image": shape.image, "floor": floor(model)}
    check = os.environ.get("AGREEMENT", "1") != "0"
    if check:
        inputs, prompt_ids, _ = hf_inputs(model, shape)
        tokens, top5 = hf_greedy(model, inputs)
        del inputs
    del model
    torch.cuda.empty_cache()
    bench = lambda batches=shape.batches, **kw: mmreg_bench(shape.path, shape.prompt, shape.image, batches, **kw)
    # The default run is traced (TRACE_NEXT=1: LLaVA-NeXT's too); its decode steps and LLaVA-1.5's
    # batch-1 prefill summarised below.
    traced_default = TRACE if first else (TRACE + "-next" if os.environ.get("TRACE_NEXT") == "1" else None)
    rec["peers"] = [bench(fused=True, trace=traced_default)]
    write_json("decode-kernels.json", result)
    if os.environ.get("OFF", "1") != "0":
        rec["peers"].append(bench(fused=False))
        write_json("decode-kernels.json", result)
    if check:
        rec["agreement"] = [agreement(shape.path, shape.image, prompt_ids, tokens, top5, fused=True)]
        write_json("decode-kernels.json", result)
    for blocks in filter(None, os.environ.get("BLOCKS" if first else "BLOCKS_NEXT", "4096" if first else "").split(",")):
        batches = "8,32" if first else "8"
        rec["peers"].append(bench(batches, fused=True, env_extra={"MMREG_DECODE_ATTENTION_BLOCKS": blocks}))
        write_json("decode-kernels.json", result)
    variants = filter(None, os.environ.get("VARIANTS" if first else "VARIANTS_NEXT", "").split(";"))
    for i, variant in enumerate(variants):
        env = dict(pair.split("=", 1) for pair in variant.split(","))
        batches = (os.environ.get("VARIANT_BATCHES", "1,8,32") if first
                   else os.environ.get("VARIANT_BATCHES_NEXT", "1,8"))
        traced = f"/tmp/trace-{'llava' if first else 'next'}-{i}" if variant in os.environ.get("TRACED", "") else None
        rec["peers"].append(bench(batches, fused=True, env_extra=env, trace=traced))
        write_json("decode-kernels.json", result)
        if traced:
            print(f"traces of {variant}:", flush=True)
            for name in ["decode_bs1", "decode_bs8"]:
                subprocess.run([sys.executable, "scripts/gpu/trace_summary.py", f"{traced}/{name}.json"])
    if traced_default:
        for name in ["decode_bs1", "decode_bs8", "decode_bs32"] + (["prefill_bs1"] if first else []):
            if os.path.exists(f"{traced_default}/{name}.json"):
                subprocess.run([sys.executable, "scripts/gpu/trace_summary.py", f"{traced_default}/{name}.json"])
    if first:
        peer = anchor(rec["peers"][0]["result"]["prompt_tokens"], shape.batches) \
            if os.environ.get("ANCHOR", "1") != "0" else None
        if peer:
            rec["peers"].append(peer)
            write_json("decode-kernels.json", result)
    print_table(f"{result['gpu']}, commit {result['commit']}: {shape.name}", rec["peers"])
for name, rec in result["models"].items():
    print_table(f"{result['gpu']}, commit {result['commit']}: {name}", rec["peers"])
    for a in rec.get("agreement", []):
        print(f"{name}: {a['label']}: top-5 rule {a.get('pass')}/{a.get('steps')} steps, identical "
              f"{a.get('identical')}", flush=True)
