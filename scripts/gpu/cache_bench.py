"""What prefix caching, the encoder cache and chunked prefill change, at 7B shapes on one GPU (issue #17).

Usage on the GPU machine (from the checkout, after `make gpu-stage`; carry ["gpu-stage"]):
    python3 scripts/gpu/cache_bench.py gpu-stage/run.sh
Makes the random bf16 LLaVA-1.5-7B and LLaVA-NeXT-Mistral-7B checkpoints (scripts/gpu/checkpoints.py) if
absent, then runs the three `mmreg bench --scenario` workloads, each both ways in one process:
  chat           LLaVA-1.5, one image, 8 turns of growing history (64 tokens per answer): TTFT per turn
                 with and without prefix caching;
  shared-images  LLaVA-1.5, 32 requests over 4 images, each prompt with its own text before the image:
                 items encoded by the vision tower and throughput with and without the encoder cache;
  long-prefill   LLaVA-NeXT, 8 running decodes while a 3-image prompt (8.5k tokens) prefills: the longest
                 gap between their tokens, in chunks of 256, 512 and 2048 tokens and in one step.
SCENARIOS=chat,shared_images picks some. Writes $OUT/cache-bench.json (raw) when OUT is set and prints markdown tables for docs/benchmarks.md.
"""
import json
import os
import sys
import time

sys.path.insert(0, "scripts/gpu")
import checkpoints  # noqa: E402
from bench_common import IMAGE15, LLAVA, NEXT, PROMPT15, mmreg  # noqa: E402

ENGINE = ["--device", "cuda", "--dtype", "bf16"]
SHARED = [IMAGE15, "fixtures/llava-tiny-real/images/a_300x200.png", "fixtures/images/astronaut.png",
          "fixtures/images/chelsea.png"]
LONG = ["fixtures/llava-next-tiny-real/images/" + f
        for f in ("long_672x672.png", "long_700x650.png", "long_660x690.png")]
PROMPT_LONG = "[INST] <image>\n<image>\n<image>\nDescribe the three images. [/INST]"


def images(paths):
    return [a for p in paths for a in ("--image", p)]


def main():
    scenarios = {
        "chat": ["--scenario", "chat", "--model", LLAVA, "--prompt", PROMPT15, *images([IMAGE15]),
                 "--max-tokens", "64"],
        "shared_images": ["--scenario", "shared-images", "--model", LLAVA, "--prompt", PROMPT15,
                          *images(SHARED), "--max-tokens", "64"],
        "long_prefill": ["--scenario", "long-prefill", "--model", NEXT, "--prompt", PROMPT_LONG,
                         *images(LONG), "--chunk", "256,512,2048"],
    }
    wanted = os.environ.get("SCENARIOS", ",".join(scenarios)).split(",")
    if {"chat", "shared_images"} & set(wanted) and not os.path.exists(f"{LLAVA}/config.json"):
        checkpoints.llava15(LLAVA)
    if "long_prefill" in wanted and not os.path.exists(f"{NEXT}/config.json"):
        checkpoints.llava_next_mistral(NEXT)
    runs = {}
    for name in wanted:
        t = time.time()
        runs[name] = mmreg(["bench", *scenarios[name], *ENGINE])
        print(f"{name}: {time.time() - t:.0f}s {json.dumps(runs[name])}", flush=True)
        # Saved as it goes: a device call that runs out of time keeps what it measured.
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "cache-bench.json"), "w") as f:
                json.dump(runs, f, indent=1)
    tables(runs)


def tables(runs):
    if "chat" not in runs:
        return tables_rest(runs)

    on, off = runs["chat"]["prefix_caching"], runs["chat"]["no_prefix_caching"]
    print("\n| turn | prompt tokens | cached | TTFT with prefix caching (ms) | without (ms) |")
    print("|---|---|---|---|---|")
    for i, (a, b) in enumerate(zip(on["ttft_ms"], off["ttft_ms"])):
        print(f"| {i + 1} | {on['prompt_tokens'][i]} | {on['cached_tokens'][i]} | {a:.1f} | {b:.1f} |")
    tables_rest(runs)


def tables_rest(runs):
    if "shared_images" not in runs:
        return tables_long(runs)
    print("\n| 32 requests, 4 images | items encoded | throughput (tok/s) | seconds |")
    print("|---|---|---|---|")
    for key in ("encoder_cache", "no_encoder_cache"):
        r = runs["shared_images"][key]
        print(f"| {key} | {r['vision_items_encoded']} | {r['tok_per_s']:.0f} | {r['seconds']:.2f} |")
    tables_long(runs)


def tables_long(runs):
    if "long_prefill" not in runs:
        return
    print("\n| 3-image NeXT prompt | prompt tokens | its TTFT (ms) | steady decode gap (ms) | mean gap while it prefills (ms) | longest gap (ms) | longest / steady |")
    print("|---|---|---|---|---|---|---|")
    for key, r in runs["long_prefill"].items():
        print(f"| {key} | {r['prompt_tokens']} | {r['ttft_ms']:.1f} | {r['decode_steady_gap_ms']:.2f} | "
              f"{r.get('decode_mean_gap_during_ms', float('nan')):.2f} | {r['decode_longest_gap_ms']:.2f} | "
              f"{r['longest_over_steady']:.2f} |")


if __name__ == "__main__":
    main()
