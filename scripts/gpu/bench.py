"""The GPU benchmark and bf16 parity run, in one go (see docs/benchmarks.md).

On random checkpoints with the LLaVA-1.5-7B and LLaVA-NeXT-Mistral-7B shapes (scripts/gpu/checkpoints.py):
- HF transformers (eager generate(), dynamic cache, sdpa): prefill as generate() computes it (the first
  forward, last-token logits only) and decode tokens/s over GEN tokens, at the batches of bench_common.SHAPES;
- mmreg (`mmreg bench`) at the same batches: as it runs by default (fused kernels on, decode attention on the
  tensor cores), with the fused kernels switched off (libtorch's ops), and on LLaVA-1.5-7B also with decode
  attention on the CUDA cores (MMREG_DECODE_ATTENTION_MMA=0); decode is timed once every prompt has prefilled
  (ttft_last_bs{b}_ms);
- the compiled-PyTorch anchor (gpt-fast's recipe) on LLaVA-1.5-7B's decoder, prompt and batches, as staged and
  with gpt-fast's own decode loop (its position kept on the device, scripts/gpu/anchor_device_pos.py);
- bf16 agreement with HF by vLLM's top-5 rule at every one of 32 steps, teacher-forced on HF's tokens, with
  and without the fused kernels;
- the batch-1 decode floor from the read bandwidth measured here.
Every peer is labelled by what was measured, in the tables and in $OUT/bench.json (docs/bench-runs/).
Run from the repo root on the GPU machine after staging (scripts/gpu-stage.sh):
    python3 scripts/gpu/bench.py gpu-stage/run.sh
PARTS=llava15,next,anchor (the default) picks the parts, for a run split across calls.
"""
import os, sys

import torch

sys.path.insert(0, "scripts/gpu")
from bench_common import (GEN, SHAPES, TRACES, agreement, anchor, floor, hf_bench, hf_greedy,  # noqa: E402
                          hf_inputs, mmreg_bench, print_table, record, repeat, write_json)

PARTS = os.environ.get("PARTS", "llava15,next,anchor").split(",")


def hf_side(model, shape):
    """HF's peer, and its greedy tokens with their top 5 and the prompt's ids, for the agreement check."""
    inputs, prompt_ids, expanded = hf_inputs(model, shape)
    tokens, top5 = hf_greedy(model, inputs)
    hf = hf_bench(model, lambda b: repeat(inputs, b), [int(b) for b in shape.batches.split(",")])
    hf["result"]["prompt_tokens"] = len(expanded)
    return hf, prompt_ids, tokens, top5


def run(shape, variants):
    """One model's part: HF, mmreg in each variant (bench_common.mmreg_bench's keywords), the agreement."""
    model = shape.make(shape.path)
    rec = {"prompt": shape.prompt, "image": shape.image, "floor": floor(model)}
    hf, prompt_ids, tokens, top5 = hf_side(model, shape)
    del model
    torch.cuda.empty_cache()
    rec["peers"] = [hf] + [mmreg_bench(shape.path, shape.prompt, shape.image, **v) for v in variants]
    rec["agreement"] = [agreement(shape.path, shape.image, prompt_ids, tokens, top5, fused=f) for f in (True, False)]
    return rec


result = record("bench")
llava15, nxt = SHAPES
if "llava15" in PARTS:
    result["models"][llava15.name] = run(llava15, [
        dict(batches=llava15.batches, fused=True, trace=TRACES), dict(batches=llava15.batches),
        dict(batches=llava15.batches, fused=True, env_extra={"MMREG_DECODE_ATTENTION_MMA": "0"})])
if "next" in PARTS:
    result["models"][nxt.name] = run(nxt, [dict(batches=nxt.batches, fused=True), dict(batches=nxt.batches)])
write_json("bench.json", result)  # before the anchor, which may run out of time
if "anchor" in PARTS:
    rec = result["models"].setdefault(llava15.name, {"prompt": llava15.prompt, "image": llava15.image, "peers": []})
    prompt_tokens = next((p["result"]["prompt_tokens"] for p in rec["peers"] if p["peer"] == "mmreg"), 604)
    # The stock anchor, then the same with gpt-fast's own decode loop (its position on the device): the
    # peer at its strongest (docs/benchmarks.md, runs 112-113).
    for device_pos in (False, True):
        peer = anchor(prompt_tokens, llava15.batches, device_pos)
        if peer:
            rec["peers"].append(peer)
            write_json("bench.json", result)

for name, rec in result["models"].items():
    print_table(f"{result['gpu']}, {result['date']}, commit {result['commit']}: {name} shapes, random bf16 "
                f"weights, {GEN} new tokens", rec["peers"])
    if "floor" in rec:
        print(f"batch-1 decode floor: {rec['floor']['decode_tok_per_s_bs1']:.0f} tokens/s "
              f"({rec['floor']['decode_weight_bytes'] / 1e9:.2f} GB at "
              f"{rec['floor']['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s)")
    for a in rec.get("agreement", []):
        print(f"bf16 agreement with HF, {a['label']}: " + (f"not measured ({a['error']})" if "error" in a else
              f"vLLM's top-5 rule passes at {a['pass']}/{a['steps']} teacher-forced steps; identical picks "
              f"{a['identical']}/{a['steps']}"))
