"""What the GPU itself allows for the benchmark's work (see docs/benchmarks.md): measured, not quoted.

- GEMM time of one LLaVA-1.5-7B prefill: every projection of the 32 decoder layers at the prompt's token
  count, plus the vision tower's and projector's for one 336x336 image, timed one shape at a time with
  torch.matmul (cuBLAS, bf16), summed. Nothing else (norms, rope, attention) is counted.
- Causal flash attention of the prompt, 32 layers.
- The decoder's other kernels, as mmreg launches them per layer (RMSNorm and weight, rope, cache writes,
  SiLU and product, residual adds), at the prompt's token count, times 32: what fusing could win.
- Memory bandwidth: reading a 4 GiB bf16 tensor (sum), and from it the time to read the 14.1 GB of weights
  once, which bounds a batch-1 decode step.
Usage on the GPU machine: python3 scripts/gpu/floors.py [TOKENS]
"""
import sys

import torch
import torch.nn.functional as F

T = int(sys.argv[1]) if len(sys.argv) > 1 else 604
dev, bf = "cuda", torch.bfloat16


def timed(fn, reps=50):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps  # ms


def gemm_ms(m, k, n):
    a = torch.randn(m, k, device=dev, dtype=bf)
    w = torch.randn(n, k, device=dev, dtype=bf)
    return timed(lambda: F.linear(a, w))


# (count per forward, m, k, n)
llm = [(32, T, 4096, 3 * 4096), (32, T, 4096, 4096), (32, T, 4096, 2 * 11008), (32, T, 11008, 4096),
       (1, 1, 4096, 32064)]
vision = [(24, 577, 1024, 3 * 1024), (24, 577, 1024, 1024), (24, 577, 1024, 4096), (24, 577, 4096, 1024),
          (1, 576, 1024, 4096), (1, 576, 4096, 4096)]
llm_ms = sum(c * gemm_ms(m, k, n) for c, m, k, n in llm)
vision_ms = sum(c * gemm_ms(m, k, n) for c, m, k, n in vision)
flops = sum(c * 2 * m * k * n for c, m, k, n in llm + vision)
q = torch.randn(1, 32, T, 128, device=dev, dtype=bf)
attn_ms = 32 * timed(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
x = torch.randn(T, 4096, device=dev, dtype=bf)
w = torch.randn(4096, device=dev, dtype=bf)
qk = torch.randn(T, 64, 128, device=dev, dtype=bf)
cos, sin = torch.randn(T, 1, 128, device=dev, dtype=bf), torch.randn(T, 1, 128, device=dev, dtype=bf)
cache = torch.zeros(T + 64, 32, 128, device=dev, dtype=bf)
slots = torch.arange(T, device=dev)
kv = torch.randn(T, 32, 128, device=dev, dtype=bf)
gate_up = torch.randn(T, 2 * 11008, device=dev, dtype=bf)


def layer_elementwise():
    for _ in range(2):  # two norms and two residual adds per layer
        w * torch.rms_norm(x, [4096], eps=1e-5)
        x + x
    qk * cos + qk.roll(64, 2) * sin
    cache.index_copy_(0, slots, kv)
    cache.index_copy_(0, slots, kv)
    F.silu(gate_up[:, :11008]) * gate_up[:, 11008:]


elementwise_ms = 32 * timed(layer_elementwise)
big = torch.empty(2 * 2**30, device=dev, dtype=bf).normal_()
read_ms = timed(lambda: big.sum(), reps=20)
bandwidth = big.numel() * 2 / (read_ms / 1000)
weights = 14.1e9
print(f"## Floors measured on {torch.cuda.get_device_name(0)}, prompt {T} tokens")
print("| what | measured |\n|---|---|")
print(f"| GEMMs of one prefill: decoder ({T} tokens) | {llm_ms:.2f} ms |")
print(f"| GEMMs of one prefill: vision tower + projector (1 image) | {vision_ms:.2f} ms |")
print(f"| their throughput | {flops / ((llm_ms + vision_ms) / 1000) / 1e12:.0f} TFLOP/s |")
print(f"| causal flash attention, 32 layers | {attn_ms:.2f} ms |")
print(f"| prefill floor (GEMMs + attention) | {llm_ms + vision_ms + attn_ms:.2f} ms |")
print(f"| decoder's other kernels ({T} tokens, 32 layers, as launched now) | {elementwise_ms:.2f} ms |")
print(f"| read bandwidth (sum of 4 GiB) | {bandwidth / 1e12:.2f} TB/s |")
print(f"| one read of the 14.1 GB of weights (batch-1 decode floor) | {weights / bandwidth * 1000:.2f} ms = "
      f"{bandwidth / weights:.0f} tokens/s |")
