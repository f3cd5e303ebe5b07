"""What the HTTP layer costs: `mmreg serve` against `mmreg generate --requests` on the same GPU, the same
requests (LLaVA-1.5-7B shapes, random bf16 weights, one image each, 128 greedy tokens without EOS).

Usage on the GPU machine (from the checkout, after `make gpu-stage`; carry ["gpu-stage"]):
    python3 scripts/gpu/serve_bench.py gpu-stage/run.sh
N (default 256) requests, CONCURRENCY (default 64) clients. Prints a markdown table for docs/serving.md;
the raw figures go to $OUT/serve-bench.json when OUT is set.

Throughput is generated tokens per second of wall time: for `generate`, from the wall time of the batch
less that of an empty batch (start-up: loading, profiling, CUDA graphs); for the server, from the first
request sent to the last answer received, after a warm-up request, with non-streaming and streaming
(SSE) answers. Only the Python standard library is used on the client side.
"""
import base64
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, "scripts/gpu")
import checkpoints  # noqa: E402
from bench_common import GEN, IMAGE15, LLAVA, PROMPT15, RUN  # noqa: E402

N = int(os.environ.get("N", "256"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "64"))
ENGINE = ["--device", "cuda", "--dtype", "bf16", "--max-num-seqs", str(CONCURRENCY)]


def timed_generate(lines):
    """Wall seconds of `mmreg generate --requests` over `lines`, and its output lines."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    t = time.perf_counter()
    out = subprocess.run([RUN, "mmreg", "generate", "--model", LLAVA, "--requests", f.name, *ENGINE],
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"generate failed: {out.stderr[-3000:]}")
    return seconds, [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def generate_throughput():
    request = {"prompt": PROMPT15, "images": [IMAGE15], "max_tokens": GEN, "temperature": 0,
               "ignore_eos": True}
    startup, _ = timed_generate([])
    seconds, results = timed_generate([request] * N)
    tokens = sum(len(r["token_ids"]) for r in results)
    return {"tokens": tokens, "seconds": seconds - startup, "startup_seconds": startup}


def start_server():
    server = subprocess.Popen([RUN, "mmreg", "serve", "--model", LLAVA, "--port", "0",
                               "--served-model-name", "llava", *ENGINE,
                               "--max-waiting-requests", str(N)],
                              stdout=subprocess.PIPE, text=True)
    for line in server.stdout:
        if line.startswith("mmreg serve: listening on "):
            return server, line.split()[-1]
    sys.exit(f"mmreg serve exited with {server.wait()}")


def post(url, body, stream):
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        if not stream:
            return json.loads(response.read())["usage"]["completion_tokens"]
        tokens = 0
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                tokens += len(chunk["choices"][0].get("token_ids", [])) if chunk["choices"] else 0
        return tokens


def server_throughput(url, stream):
    image = "data:image/png;base64," + base64.b64encode(open(IMAGE15, "rb").read()).decode()
    body = {"model": "llava", "prompt": PROMPT15, "images": [image], "max_tokens": GEN, "temperature": 0,
            "ignore_eos": True, "stream": stream, "return_token_ids": True}
    post(url, body, stream)  # warm-up
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        tokens = sum(pool.map(lambda _: post(url, body, stream), range(N)))
    return {"tokens": tokens, "seconds": time.perf_counter() - t}


def main():
    import torch

    if not os.path.exists(f"{LLAVA}/config.json"):
        del_model = checkpoints.llava15(LLAVA)
        del del_model
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(0)
    results = {"generate": generate_throughput()}
    server, url = start_server()
    try:
        results["serve"] = server_throughput(url, stream=False)
        results["serve (stream)"] = server_throughput(url, stream=True)
    finally:
        server.terminate()
        server.wait()
    base = results["generate"]["tokens"] / results["generate"]["seconds"]
    print(f"## {gpu}: LLaVA-1.5-7B shapes, {N} requests of {GEN} tokens, {CONCURRENCY} at a time")
    print("| | tokens/s | vs generate |")
    print("|---|---|---|")
    for name, r in results.items():
        rate = r["tokens"] / r["seconds"]
        print(f"| {name} | {rate:.0f} | {100 * (rate / base - 1):+.1f}% |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "serve-bench.json"), "w") as f:
            json.dump({"gpu": gpu, "n": N, "concurrency": CONCURRENCY, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
