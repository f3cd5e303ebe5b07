"""What bench.py and quick_bench.py share: the staged runner, the inputs, and how mmreg is called."""
import json, os, subprocess, sys

RUN = sys.argv[1] if len(sys.argv) > 1 else "gpu-stage/run.sh"
GEN = 128  # tokens generated per request in the decode measurement
LLAVA, NEXT = "/tmp/llava-1.5-7b", "/tmp/llava-next-mistral-7b"
TRACES = os.environ.get("TRACES", "/tmp/mmreg-traces")  # Kineto traces of mmreg (scripts/gpu/trace_summary.py)
IMAGE15 = "fixtures/llava-tiny-real/images/b_480x640.png"
IMAGE_NEXT = "fixtures/llava-next-tiny-real/images/landscape_480x640.png"
PROMPT15 = "USER: <image>\nWhat is shown in this image? Describe every detail of it, please. ASSISTANT:"
PROMPT_NEXT = "[INST] <image>\nWhat is shown in this image? [/INST]"


def mmreg(args, eager=False, fused=False, binary="mmreg"):
    """Runs the staged `mmreg` (or another staged binary, such as `mmreg-before`) and returns the JSON
    object of its last line. eager: without CUDA graphs; fused: with the (opt-in) fused kernels."""
    env = dict(os.environ)
    if eager:
        env["MMREG_NO_CUDA_GRAPHS"] = "1"
    if fused:
        env["MMREG_FUSED_KERNELS"] = "1"
    out = subprocess.run([RUN, binary, *args], capture_output=True, text=True, env=env)
    sys.stderr.write(out.stderr[-3000:])
    if out.returncode != 0:
        print(out.stdout)
        sys.exit(f"mmreg {args[0]} failed with {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])
