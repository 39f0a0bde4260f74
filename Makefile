# README's two commands: `make demo` (set up, then run the main job on generated data)
# and `make test` (set up, then run the tests). Both work on a fresh checkout.
VENV := .venv
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean image push
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
	$(VENV)/bin/pytest -m "not gpu" $(PYTEST_ARGS)

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
