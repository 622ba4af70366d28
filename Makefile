# The two commands of the README. Each sets itself up on a fresh machine: a virtual environment
# in .venv with the project and its dev tools installed (re-installed when pyproject.toml changes).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## demo: run the main job end to end on the embedded defaults, into out/
demo: $(STAMP)
	$(BIN)/imagegen demo --out out

## test: lint and run the test suite (the multi-node Ray tests in their own process: they start their own clusters)
test: $(STAMP)
	$(BIN)/ruff check imagegen tests bench
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q tests/cluster

bench: $(STAMP)
	$(BIN)/python bench/render_batch.py

clean:
	rm -rf out .pytest_cache .ruff_cache
