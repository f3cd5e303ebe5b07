"""What happens between two replays of a decode step's graph, in a Kineto trace of `mmreg bench --trace`.

For PERIODS (4) consecutive pairs of replays of the most-replayed graph (from the fourth on): every GPU
event from the end of one replay's last kernel to the start of the next one's first kernel, with the idle
time before it, and the host's CUDA runtime calls in that window (times relative to the replay's end on
the GPU; a negative time was issued while the replay still ran). A gap the host's calls explain (the
next launch came late) reads differently from one between events issued long before.
Usage: python3 scripts/gpu/step_gaps.py TRACE.json [...]
"""
import collections, json, os, sys

from trace_summary import GPU, step_replays


def gaps(path):
    events = json.load(open(path))["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in GPU and "dur" in e), key=lambda e: e["ts"])
    runtime = sorted((e for e in events if e.get("cat") == "cuda_runtime" and "dur" in e), key=lambda e: e["ts"])
    by_corr = {e.get("args", {}).get("correlation"): e for e in runtime}
    by_launch = collections.defaultdict(list)
    for e in gpu:
        by_launch[e["args"].get("correlation")].append(e)
    replays = step_replays(by_launch, {c for c, e in by_corr.items() if e["name"] == "cudaGraphLaunch"})
    if not replays:
        print(f"## {path}: no graph replays")
        return
    print(f"## {path}: {len(replays)} replays of {len(replays[0])} kernels")
    pairs = list(zip(replays, replays[1:]))
    for a, b in pairs[3:3 + int(os.environ.get("PERIODS", "4"))]:
        end = max(k["ts"] + k["dur"] for k in a)
        start = b[0]["ts"]
        launch = by_corr[b[0]["args"]["correlation"]]
        print(f"\n### graph end to next graph start: {start - end:.1f} us (its launch call at "
              f"{launch['ts'] - end:+.1f} us, {launch['dur']:.1f} us long)")
        print("| idle before (us) | GPU event | dur (us) | issued by (host, us from graph end) |\n|---|---|---|---|")
        inside = {id(k) for k in a} | {id(k) for k in b}
        cursor = end
        for e in gpu:
            if e["ts"] < end - 0.5 or e["ts"] >= start or id(e) in inside:
                continue
            call = by_corr.get(e["args"].get("correlation"))
            issued = f"`{call['name']}` at {call['ts'] - end:+.1f}" if call else "?"
            print(f"| {max(0.0, e['ts'] - cursor):.1f} | `{e['name'][:50]}` | {e['dur']:.1f} | {issued} |")
            cursor = max(cursor, e["ts"] + e["dur"])
        print(f"| {max(0.0, start - cursor):.1f} | next graph | | `cudaGraphLaunch` at {launch['ts'] - end:+.1f} |")
        # The host's runtime calls from the replay's last third to the next launch.
        since = a[0]["ts"] + (end - a[0]["ts"]) * 2 / 3
        calls = [c for c in runtime if since <= c["ts"] <= launch["ts"]]
        summary = collections.Counter()
        for c in calls:
            summary[c["name"]] += 1
        print("host calls since the replay's last third: "
              + ", ".join(f"{n} ×{k}" for n, k in summary.most_common(8)))
        slow = [c for c in calls if c["dur"] > 20]
        for c in slow[:6]:
            print(f"  slow call `{c['name']}` at {c['ts'] - end:+.1f} us, {c['dur']:.1f} us")


for p in sys.argv[1:]:
    gaps(p)
