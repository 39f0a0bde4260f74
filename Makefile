# README's two commands: `make demo` (set up, then run the main job on generated data)
# and `make test` (set up, then run the tests). Both work on a fresh checkout.
VENV := .venv
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-slow test-gpu lint bench clean image push
# Cluster images (docker/Dockerfile): REGISTRY/tagray:VERSION-cpu and -cuda; clusters/*.yaml name ghcr.io/your-org.
REGISTRY ?= ghcr.io/your-org
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/tagray demo

test: setup
	bash scripts/setup_browser.sh
	$(VENV)/bin/ruff check tagray tests benchmarks scripts
	$(VENV)/bin/pytest -m "not gpu and not slow" --durations=25 $(PYTEST_ARGS)

# The fast tier only (no Ray cluster, no S3 server): what `pytest` alone runs.
test-fast: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The slow tier: each head's shipped defaults at 20,000 images, refine at 3,000 (tests/test_defaults.py).
test-slow: setup
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

# The GPU tier (tests/test_gpu.py) on a machine with CUDA; without one every test skips.
# On GPU images that bring their own torch: CONSTRAINTS= make test-gpu
test-gpu: setup
	$(VENV)/bin/pytest -m gpu $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check tagray tests benchmarks scripts

clean:
	rm -rf runs/ .pytest_cache

image:
	docker build -f docker/Dockerfile --target cpu -t $(REGISTRY)/tagray:$(VERSION)-cpu .
	docker build -f docker/Dockerfile --target cuda -t $(REGISTRY)/tagray:$(VERSION)-cuda .

push: image
	docker push $(REGISTRY)/tagray:$(VERSION)-cpu
	docker push $(REGISTRY)/tagray:$(VERSION)-cuda
