# The two commands of the README. Both set up libtorch on first use (scripts/libtorch.sh).
.PHONY: demo test libtorch gpu-stage

libtorch:
	@./scripts/libtorch.sh > /dev/null

## The main job: list the registered models, then run LLaVA on a sample image.
demo: libtorch
	cargo run --quiet -p mmreg -- models
	cargo run --quiet -p mmreg -- check
	cargo run --quiet -p mmreg -- generate --model fixtures/llava-tiny-real \
		--image fixtures/llava-tiny-real/images/a_300x200.png \
		--prompt "USER: <image>\nWhat is shown in this image? ASSISTANT:" --max-tokens 8 --json

## The tests, on CPU (a CUDA smoke test reports itself skipped where there is no GPU).
test: libtorch
	cargo test --workspace

## Release binaries and test binaries for the GPU machine, staged in gpu-stage/ (see docs/gpu.md).
gpu-stage: libtorch
	./scripts/gpu-stage.sh
