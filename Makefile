# README's two commands: `make demo` (set up, then run the main job on generated data)
# and `make test` (set up, then run the tests). Both work on a fresh checkout.
VENV := .venv
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/tagray demo

test: setup
	bash scripts/setup_browser.sh
	$(VENV)/bin/ruff check tagray tests benchmarks scripts
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check tagray tests benchmarks scripts

clean:
	rm -rf runs/ .pytest_cache
