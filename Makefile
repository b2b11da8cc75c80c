# The two commands: `make demo` (the main job on the built-in default) and `make test`.
# Each creates or reuses .venv and installs what it needs: torch==2.13.0 first (a CPU build
# on this kind of machine; a bare `torch` may pull several GB of CUDA), then uniprobe editable.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.stamp-base
DEV := $(VENV)/.stamp-dev

.PHONY: demo test lint bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BASE): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $(BASE)

$(DEV): $(BASE)
	$(BIN)/python -m pip install -q -e ".[dev,gpu]"
	touch $(DEV)

demo: $(BASE)
	$(BIN)/uniprobe demo

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

bench: $(DEV)
	$(BIN)/python experiments/bench/probes.py
	$(BIN)/python experiments/bench/patching.py

clean-venv:
	rm -rf $(VENV)
