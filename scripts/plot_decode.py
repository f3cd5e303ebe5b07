"""Plots decode tokens/s against batch size from the GPU benchmarks' raw JSON (docs/img/decode-throughput.png).

Usage: python3 scripts/plot_decode.py docs/bench-runs/RUN-bench.json [MORE.json ...] [--model LLaVA-1.5-7B]
       [--out docs/img/decode-throughput.png] [--skip TEXT ...]
Every peer of the model in each file (bench.py's and quick_bench.py's JSON: mmreg with each set of switches,
HF transformers, the compiled-PyTorch anchor) becomes a line labelled as the file labels it, and the
bandwidth floor at each batch (the weights and each sequence's keys and values read once a step at the
bandwidth measured in the run, scripts/floor_shares.py) a dashed line where the file has it; --skip leaves
out the peers whose label contains a given text (a switch measured and removed).
Older files are read too: {"hf", "mmreg"} (qwen2_vl_7b.py and the parity scripts) and quick_bench's {"runs"},
labelled by their keys. No figure is typed in here.
"""
import argparse, json, os, re, sys, textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from floor_shares import floor_tok_per_s  # noqa: E402

STYLE = {"mmreg": "o-", "hf": "s-", "anchor": "v-."}


def peers(doc, model):
    """(kind, label, result) of each peer of `model` in a run's JSON, whatever its layout."""
    if "models" in doc:
        return [(p["peer"], p["label"], p["result"]) for p in doc["models"].get(model, {}).get("peers", [])]
    if "runs" in doc:  # quick_bench before #18
        return [(kind, label, r[key]) for r in doc["runs"] if r["model"] == model
                for kind, label, key in [("mmreg", r["binary"], "result"), ("mmreg", r["binary"] + " fused", "fused")]
                if r.get(key)]
    if doc.get("model", model) == model:
        return [(k, {"hf": "HF transformers", "mmreg": "mmreg"}[k], doc[k]) for k in ("hf", "mmreg") if k in doc]
    return []


def decode(result):
    points = sorted((int(m.group(1)), v) for k, v in result.items()
                    if (m := re.fullmatch(r"decode_tok_per_s_bs(\d+)", k)))
    return [b for b, _ in points], [v for _, v in points]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--model", default="LLaVA-1.5-7B")
    parser.add_argument("--out", default="docs/img/decode-throughput.png")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out peers whose label contains this")
    args = parser.parse_args()
    docs = [(os.path.basename(f).removesuffix(".json"), json.load(open(f))) for f in args.files]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, doc in docs:
        tag = f" [{name}]" if len(docs) > 1 else ""
        measured = set()
        for kind, label, result in peers(doc, args.model):
            if any(text in label for text in args.skip):
                continue
            batches, values = decode(result)
            if batches:
                style = ":^" if "graphs off" in label else STYLE.get(kind, "o-")
                ax.plot(batches, values, style, label=textwrap.fill(label + tag, 90))
                measured.update(batches)
        prompt = next((r.get("prompt_tokens") for _, _, r in peers(doc, args.model) if r.get("prompt_tokens")), None)
        batches = sorted(measured)
        f = [floor_tok_per_s(doc, args.model, b, prompt) for b in batches]
        if f and None not in f:
            ax.plot(batches, f, "--", color="gray", lw=1,
                    label=f"bandwidth floor: weights and KV read once a step ({f[0]:.0f} tok/s at batch "
                          f"{batches[0]}){tag}")
    if not ax.lines:
        raise SystemExit(f"no decode figures for {args.model} in {args.files}")
    first = docs[0][1]
    prompt = next((r.get("prompt_tokens") for _, _, r in peers(first, args.model) if r.get("prompt_tokens")), None)
    ax.set_title(", ".join(str(x) for x in [first.get("gpu"), first.get("date"), f"{args.model} shapes, bf16",
                                            prompt and f"{prompt:.0f}-token prompt", (first.get("commit") or "")[:10]]
                           if x), fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel("decode tokens/s (all requests)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: the labels are long
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
