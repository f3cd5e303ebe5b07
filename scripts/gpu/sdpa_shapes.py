"""What libtorch's attention backends cost on a shape they have not seen, and after: the first call's
milliseconds (cuDNN builds an execution plan per shape and caches it by shape) and the steady time, for
LLaVA-1.5's and LLaVA-NeXT-Mistral's prefill shapes (bf16, causal, [batch, heads, len, 128] laid out
token-major as the engine's queries are). Usage on the GPU machine: python3 scripts/gpu/sdpa_shapes.py"""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev, dt = "cuda", torch.bfloat16
print("torch", torch.__version__, "cuDNN", torch.backends.cudnn.version(), torch.cuda.get_device_name())


def tensors(b, s, heads, d=128):
    return torch.randn(b, s, heads, d, device=dev, dtype=dt).transpose(1, 2)


def run(backend, b, h, hk, s, reps=20):
    q, k, v = tensors(b, s, h), tensors(b, s, hk), tensors(b, s, hk)
    ctx = sdpa_kernel(backend) if backend is not None else torch.enable_grad()
    with ctx, torch.no_grad():
        torch.cuda.synchronize()
        t = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != hk)
        torch.cuda.synchronize()
        first = (time.perf_counter() - t) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != hk)
        end.record()
        torch.cuda.synchronize()
    return first, start.elapsed_time(end) * 1e3 / reps


shapes = [(1, 32, 32, 604), (1, 32, 32, 605), (1, 32, 32, 1000), (8, 32, 32, 604), (1, 32, 8, 2358),
          (1, 32, 8, 2236), (1, 32, 8, 2357), (3, 32, 8, 2358), (1, 32, 8, 1118)]
backends = [("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
print("| backend | batch, heads/kv, len | first call (ms) | steady (us) |\n|---|---|---|---|")
for name, backend in backends:
    for b, h, hk, s in shapes:
        try:
            first, steady = run(backend, b, h, hk, s)
            print(f"| {name} | {b}, {h}/{hk}, {s} | {first:.1f} | {steady:.1f} |", flush=True)
        except RuntimeError as e:
            print(f"| {name} | {b}, {h}/{hk}, {s} | error: {str(e)[:80]} | |", flush=True)
