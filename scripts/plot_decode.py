"""Plots decode throughput against batch size for mmreg and HF transformers (docs/img/decode-throughput.png).

The numbers are the GPU benchmark's (scripts/gpu/bench.py); update them here after a new run.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CARD = "NVIDIA H200, LLaVA-1.5-7B shapes, bf16, 604-token prompt, 128 new tokens"
# Run 7 (16920b8), one H200, all three in the same run.
MMREG = {1: 177.0, 8: 1004.2, 32: 1779.3}
MMREG_EAGER = {1: 106.6, 8: 846.5}
HF = {1: 12.0, 8: 136.2, 32: 517.7}
FLOOR_BS1 = 4.18e12 / 14.1e9  # batch-1 floor: 14.1 GB of weights read once per token at the measured 4.18 TB/s

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
