"""Summarises a Kineto Chrome trace written by `mmreg bench --trace DIR` (see docs/benchmarks.md).

Groups the GPU's kernels by the launch that issued them (one cudaGraphLaunch replays a whole graph), and
prints per launch kind: how many, kernels each, GPU span and busy time; then, for the graph with the
most replays, each position's mean duration over its replays (the first FIRST=20 and last LAST=6); then
the kernels that took the most time in all; then the GPU's longest idle gaps, each with the host's ops
before the launch that ended it. Usage: python3 scripts/gpu/trace_summary.py TRACE.json [...]
"""
import collections, json, os, sys

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
    # The graph replayed most often (a decode step's): each position's mean duration,
    # for the first FIRST positions (the embedding and the first layers) and the last LAST (the head).
    replays = step_replays(by_launch, {c for c, name in launches.items() if name == "cudaGraphLaunch"})
    if replays:
        most = len(replays[0])
        first, last = int(os.environ.get("FIRST", "20")), int(os.environ.get("LAST", "6"))
        print(f"\n{len(replays)} replays of {most} kernels; mean duration by position (us):\n"
              "| position | kernel | mean (us) |\n|---|---|---|")
        for i in list(range(min(first, most))) + list(range(max(first, most - last), most)):
            mean = sum(ks[i]["dur"] for ks in replays) / len(replays)
            print(f"| {i} | `{replays[0][i]['name'][:60]}` | {mean:.1f} |")
        between(replays, gpu)
    totals = collections.defaultdict(lambda: [0, 0.0])
    for e in gpu:
        t = totals[e["name"][:90]]
        t[0] += 1
        t[1] += e["dur"]
    print("\n| kernel | count | total (ms) | share |\n|---|---|---|---|")
    for name, (count, dur) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"| `{name}` | {count} | {dur / 1000:.2f} | {dur / busy:.0%} |")
    # Where the GPU sat idle: the longest gaps between one kernel's end and the next one's start (the
    # host was late: a wait for the device, a pageable copy, or host work between launches).
    ordered = sorted(gpu, key=lambda e: e["ts"])
    gaps, reach = [], ordered[0]["ts"] + ordered[0]["dur"]
    for before, after in zip(ordered, ordered[1:]):
        if after["ts"] > reach:
            gaps.append((after["ts"] - reach, before["name"], after, after["ts"] - start))
        reach = max(reach, after["ts"] + after["dur"])
    idle = sum(g for g, *_ in gaps)
    print(f"\nidle {idle / 1000:.2f} ms in {len(gaps)} gaps; the longest "
          f"(GAPS={os.environ.get('GAPS', '8')}), with the host's ops between the launch before the gap's "
          "next kernel and its own (what kept the host from issuing it sooner):\n"
          "| idle (us) | at (ms) | after | before | host ops between the two launches (us) |\n|---|---|---|---|---|")
    host = host_ops(events, gpu)
    for gap, before, after, at in sorted(gaps, key=lambda g: -g[0])[:int(os.environ.get("GAPS", "8"))]:
        print(f"| {gap:.1f} | {at / 1000:.2f} | `{before[:50]}` | `{after['name'][:50]}` | {host(after)} |")
    print()


def step_replays(by_launch, graph_launches):
    """The replays of the graph replayed most often (a decode step's; of equal counts, the larger), in the
    order they ran, each its kernels in time order: `by_launch` maps a launch's correlation id to its GPU
    events, `graph_launches` holds the ids of the cudaGraphLaunch calls. [] where no graph ran."""
    graphs = [sorted(ks, key=lambda k: k["ts"]) for corr, ks in by_launch.items() if corr in graph_launches]
    if not graphs:
        return []
    counts = collections.Counter(len(ks) for ks in graphs)
    most = max(counts, key=lambda n: (counts[n], n))
    return sorted((ks for ks in graphs if len(ks) == most), key=lambda ks: ks[0]["ts"])


def between(replays, gpu):
    """A step's GPU period: from one replay's first kernel to the next replay's of the same graph, against
    the replay's own span, and the GPU work outside the graph in between (sampling, copies; another
    graph's kernels too, where one ran between them) by name, per period."""
    periods, outside = [], collections.defaultdict(lambda: [0, 0.0])
    in_graph = {id(k) for ks in replays for k in ks}
    for a, b in zip(replays, replays[1:]):
        start, end = a[0]["ts"], b[0]["ts"]
        periods.append((end - start, max(k["ts"] + k["dur"] for k in a) - start))
        for e in gpu:
            if start <= e["ts"] < end and id(e) not in in_graph:
                t = outside[e["name"][:60]]
                t[0] += 1
                t[1] += e["dur"]
    if not periods:
        return
    n = len(periods)
    period = sum(p for p, _ in periods) / n
    span = sum(s for _, s in periods) / n
    print(f"\nreplay to replay: {period / 1000:.3f} ms a step (the replay's span {span / 1000:.3f} ms, "
          f"{n} periods); outside the graph, per period:")
    print("| kernel or copy | count | us |\n|---|---|---|")
    for name, (count, dur) in sorted(outside.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"| `{name}` | {count / n:.1f} | {dur / n:.1f} |")


def host_ops(events, gpu):
    """For a GPU event, the host's top-level ops (CPU ops and annotations, by total time, at most 3) between
    the end of the runtime call before the one that issued it and the start of that call; '–' where it is
    not the first GPU event of its call (a graph's later kernels) or its call was not recorded."""
    first = {}
    for e in gpu:
        corr = e.get("args", {}).get("correlation")
        if corr not in first or e["ts"] < first[corr]["ts"]:
            first[corr] = e
    runtime = sorted((e for e in events if e.get("cat") == "cuda_runtime" and "dur" in e), key=lambda e: e["ts"])
    by_corr = {e.get("args", {}).get("correlation"): e for e in runtime}
    ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e),
                 key=lambda e: e["ts"])

    def describe(gpu_event):
        corr = gpu_event.get("args", {}).get("correlation")
        launch = by_corr.get(corr)
        if launch is None or first.get(corr) is not gpu_event:
            return "–"
        earlier = [e for e in runtime if e["ts"] + e["dur"] <= launch["ts"]]
        since = earlier[-1]["ts"] + earlier[-1]["dur"] if earlier else launch["ts"]
        inside = [e for e in ops if since <= e["ts"] and e["ts"] + e["dur"] <= launch["ts"]]
        # Top level: not inside another op of the window (same thread).
        top = [e for e in inside if not any(o is not e and o.get("tid") == e.get("tid") and o["ts"] <= e["ts"]
                                            and e["ts"] + e["dur"] <= o["ts"] + o["dur"] for o in inside)]
        totals = collections.Counter()
        for e in top:
            totals[e["name"][:40]] += e["dur"]
        listed = ", ".join(f"`{name}` {dur:.0f}" for name, dur in totals.most_common(3))
        return f"{launch['ts'] - since:.0f} since the last call: {listed or 'no op recorded'}"

    return describe


if __name__ == "__main__":
    for p in sys.argv[1:]:
        summarise(p)
