# The two commands of the README. Both set up libtorch on first use (scripts/libtorch.sh).
.PHONY: demo test libtorch gpu-stage

SAMPLES := $(wildcard assets/shapes-llava/samples/*.png)

libtorch:
	@./scripts/libtorch.sh > /dev/null

## The main job: the registered models, then the embedded demo model describing the sample images.
demo: libtorch
	@cargo build --quiet -p mmreg
	@./target/debug/mmreg models
	@echo
	@echo "The embedded demo model (assets/shapes-llava, trained by scripts/shapes/train.py) describes the samples:"
	@for image in $(SAMPLES); do \
		printf '%-28s -> ' "$$(basename $$image)"; \
		./target/debug/mmreg generate --image "$$image" --prompt "<image> describe:" --max-tokens 24; \
	done

## The tests, on CPU (a CUDA smoke test reports itself skipped where there is no GPU).
test: libtorch
	cargo test --workspace

## Release binaries and test binaries for the GPU machine, staged in gpu-stage/ (see docs/gpu.md).
gpu-stage: libtorch
	./scripts/gpu-stage.sh
