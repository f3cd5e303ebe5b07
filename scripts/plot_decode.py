"""Plots decode throughput against batch size for mmreg and HF transformers (docs/img/decode-throughput.png).

The numbers are the GPU benchmark's (scripts/gpu/bench.py); update them here after a new run.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CARD = "NVIDIA H200, LLaVA-1.5-7B shapes, bf16, 604-token prompt, 128 new tokens"
# Run 9 (8b2eb60), one H200, all three in the same run.
MMREG = {1: 183.0, 8: 1017.3, 32: 1804.9}
MMREG_EAGER = {1: 75.3, 8: 457.1}
HF = {1: 15.5, 8: 124.3, 32: 443.6}
FLOOR_BS1 = 4.24e12 / 14.1e9  # batch-1 floor: 14.1 GB of weights read once per token at the measured 4.24 TB/s (run 8)

fig, ax = plt.subplots(figsize=(7, 4.5))
ax.plot(list(MMREG), list(MMREG.values()), "o-", label="mmreg")
ax.plot(list(MMREG_EAGER), list(MMREG_EAGER.values()), "^:", label="mmreg without CUDA graphs")
ax.plot(list(HF), list(HF.values()), "s-", label="HF transformers 5.17 (sdpa)")
ax.axhline(FLOOR_BS1, color="gray", ls="--", lw=1, label=f"batch-1 bandwidth floor ({FLOOR_BS1:.0f} tok/s)")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("batch size (concurrent requests)")
ax.set_ylabel("decode tokens/s (all requests)")
ax.set_title(CARD, fontsize=9)
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig("docs/img/decode-throughput.png", dpi=120)
