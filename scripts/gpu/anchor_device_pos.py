"""The compiled-PyTorch anchor with its decode position kept on the device, as gpt-fast's own loop keeps it.

The staged anchor (gpu-stage/peers/compiled_llama_anchor.py, from ../shared/bench/) makes each step's
position with `torch.tensor([P + j], device=dev)`: a copy from pageable memory, which makes the host wait
for the GPU every token, so the host's time to issue the next step falls between steps. gpt-fast's
`decode_n_tokens` keeps `input_pos` on the device and adds one to it in place, and the host runs ahead.
This runs the staged anchor's own code with only that loop changed (the script stops if the loop is not
the one expected), so that the peer is measured at its strongest beside the stock one.
Usage: python3 scripts/gpu/anchor_device_pos.py [P] [G] [BS,..]   (the anchor's arguments)
"""
import os, sys

# (Not $ANCHOR: quick_bench.py sets ANCHOR=1 for the peer itself.)
ANCHOR = os.environ.get("ANCHOR_SCRIPT", "gpu-stage/peers/compiled_llama_anchor.py")
source = open(ANCHOR).read()
STOCK = "            for j in range(G - 1):\n                tok = compiled(model, tok, torch.tensor([P + j], device=dev)).clone()\n"
ON_DEVICE = ("            pos = torch.tensor([P], device=dev)\n"
             "            for j in range(G - 1):\n"
             "                tok = compiled(model, tok, pos).clone()\n"
             "                pos += 1\n")
LABEL = 'res = {"mode": mode,'
if source.count(STOCK) != 1 or source.count(LABEL) != 1:
    sys.exit(f"{ANCHOR}: its decode loop is not the one this script changes; nothing run")
source = source.replace(STOCK, ON_DEVICE).replace(
    LABEL, 'res = {"variant": "decode position on the device (gpt-fast\'s loop)", "mode": mode,')
sys.argv[0] = ANCHOR
exec(compile(source, ANCHOR + " (position on the device)", "exec"))
