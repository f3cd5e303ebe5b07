"""Summarises a Kineto Chrome trace written by `mmreg bench --trace DIR` (see docs/benchmarks.md).

Groups the GPU's kernels by the launch that issued them (one cudaGraphLaunch replays a whole graph), and
prints per launch kind: how many, kernels each, GPU span and busy time; then the kernels that took the
most time in all. Usage: python3 scripts/gpu/trace_summary.py TRACE.json [...]
"""
import collections, json, sys

GPU = ("kernel", "gpu_memcpy", "gpu_memset")


def summarise(path):
    events = json.load(open(path))["traceEvents"]
    gpu = [e for e in events if e.get("cat") in GPU and "dur" in e]
    launches = {e["args"].get("correlation"): e["name"] for e in events
                if e.get("cat") == "cuda_runtime" and "args" in e}
    by_launch = collections.defaultdict(list)
    for e in gpu:
        by_launch[e["args"].get("correlation")].append(e)
    kinds = collections.defaultdict(list)  # (launch name, kernel count) -> [(span, busy)]
    for corr, ks in by_launch.items():
        name = launches.get(corr, "?")
        span = max(k["ts"] + k["dur"] for k in ks) - min(k["ts"] for k in ks)
        kinds[(name if name == "cudaGraphLaunch" else "eager launches", len(ks) if name == "cudaGraphLaunch" else 0)] \
            .append((span, sum(k["dur"] for k in ks)))
    if not gpu:
        print(f"## {path}: no GPU activity recorded\n")
        return
    start = min(e["ts"] for e in gpu)
    end = max(e["ts"] + e["dur"] for e in gpu)
    busy = sum(e["dur"] for e in gpu)
    print(f"## {path}: GPU from first to last kernel {(end - start) / 1000:.2f} ms, busy {busy / 1000:.2f} ms, "
          f"{len(gpu)} kernels/copies")
    print("| issued by | launches | kernels each | GPU span per launch (ms) | busy (ms): per graph launch, or all eager kernels |\n|---|---|---|---|---|")
    for (name, count), spans in sorted(kinds.items(), key=lambda kv: -sum(s for s, _ in kv[1])):
        n = len(spans)
        if name == "eager launches":
            print(f"| eager | {n} | 1 | – | {sum(b for _, b in spans) / 1000:.3f} |")
        else:
            print(f"| graph | {n} | {count} | {sum(s for s, _ in spans) / n / 1000:.2f} | "
                  f"{sum(b for _, b in spans) / n / 1000:.2f} |")
    totals = collections.defaultdict(lambda: [0, 0.0])
    for e in gpu:
        t = totals[e["name"][:90]]
        t[0] += 1
        t[1] += e["dur"]
    print("\n| kernel | count | total (ms) | share |\n|---|---|---|---|")
    for name, (count, dur) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"| `{name}` | {count} | {dur / 1000:.2f} | {dur / busy:.0%} |")
    print()


for p in sys.argv[1:]:
    summarise(p)
