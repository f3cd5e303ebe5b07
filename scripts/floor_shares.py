"""Each decode figure of a benchmark run's JSON beside its bandwidth floor at that batch, from the run's own file.

A decode step reads the decoder's and LM head's weights once and each sequence's keys and values. So the floor
at batch b is b tokens per (weights + b x context x KV bytes a position) / the read bandwidth, where the
context is the prompt plus half of the GEN new tokens (the mean over the decode window). Bandwidth and weight
bytes come from the file's `floor` record (bench_common.floor, measured on the card in the same call); the KV
bytes a position from that record too (runs from session 39 on), else from the model's shape below. No
figure is typed in: every number printed is computed from the file.
Usage: python3 scripts/floor_shares.py docs/bench-runs/RUN.json [...] [--width 70]
"""
import argparse, json

GEN = 128  # tokens generated per request (bench_common.GEN)
# Keys and values a position, in bytes, for runs whose floor record predates `kv_bytes_per_token`:
# layers x 2 (key, value) x key/value heads x head dim x 2 bytes (bf16), from scripts/gpu/checkpoints.py.
KV_BYTES = {
    "LLaVA-1.5-7B": 32 * 2 * 32 * 128 * 2,  # Vicuna-7B: 32 heads, no GQA
    "LLaVA-NeXT-Mistral-7B": 32 * 2 * 8 * 128 * 2,  # Mistral-7B: 8 key/value heads
}


def floor_tok_per_s(doc, model, batch, prompt):
    """Tokens/s at `batch` if a decode step of `model` (a prompt of `prompt` tokens) took only the time to read
    its bytes at the bandwidth the file measured; None where the file has no floor or the KV size is unknown."""
    floor = doc.get("models", {}).get(model, {}).get("floor") or {}
    kv = floor.get("kv_bytes_per_token") or KV_BYTES.get(model)
    if "bandwidth_bytes_per_s" not in floor or "decode_weight_bytes" not in floor or not kv or not prompt:
        return None
    step_bytes = floor["decode_weight_bytes"] + batch * (prompt + GEN / 2) * kv
    return batch * floor["bandwidth_bytes_per_s"] / step_bytes


def rows(doc):
    """(model, peer label, batch, tok/s, floor tok/s, share) for each decode figure of the file."""
    for model, rec in doc.get("models", {}).items():
        for peer in rec.get("peers", []):
            result = peer.get("result", {})
            for key, value in result.items():
                if not key.startswith("decode_tok_per_s_bs") or not isinstance(value, (int, float)):
                    continue
                batch = int(key.removeprefix("decode_tok_per_s_bs"))
                best = floor_tok_per_s(doc, model, batch, result.get("prompt_tokens"))
                if best:
                    yield model, peer["label"], batch, value, best, value / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--width", type=int, help="labels cut to their last WIDTH characters (where peers differ)")
    args = parser.parse_args()
    for path in args.files:
        doc = json.load(open(path))
        bw = {m: r["floor"]["bandwidth_bytes_per_s"] for m, r in doc.get("models", {}).items() if r.get("floor")}
        print(f"## {path} ({doc.get('gpu')}; read bandwidth "
              + ", ".join(f"{m} {b / 1e12:.2f} TB/s" for m, b in bw.items()) + ")")
        print("| model | peer | batch | decode tok/s | floor | share |")
        print("|---|---|---|---|---|---|")
        for model, label, batch, value, best, share in sorted(rows(doc), key=lambda r: (r[0], r[1], r[2])):
            label = label[-args.width:] if args.width else label
            print(f"| {model} | {label} | {batch} | {value:.1f} | {best:.0f} | {share:.0%} |")


if __name__ == "__main__":
    main()
