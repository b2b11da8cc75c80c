# The two commands: `make demo` (the main job on the built-in default) and `make test`.
# Each creates or reuses .venv and installs what it needs: torch==2.13.0 first (a CPU build
# on this kind of machine; a bare `torch` may pull several GB of CUDA), then uniprobe editable
# with every other package at the exact version of the lock (constraints.txt), so a fresh clone
# runs the tested set whatever the package index serves today.
#
#   make lock          regenerate constraints.txt: the newest versions setup.cfg allows, resolved
#                      in a scratch venv (then run `make test` and commit both)
#   make test-latest   the fast suite (not the slow marker) in .venv-latest, upgraded to the newest
#                      versions setup.cfg allows: shows drift in dependencies before users meet it
#   make test-oldest   the fast suite in .venv-oldest at the oldest versions setup.cfg allows
#                      (constraints-oldest.txt)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := constraints.txt
OLDEST := constraints-oldest.txt
BASE := $(VENV)/.stamp-base
DEV := $(VENV)/.stamp-dev
TORCH := torch==2.13.0
VERSIONS := import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in \
	('torch', 'transformers', 'transformer-lens', 'nnsight', 'numpy', 'safetensors', 'matplotlib')))

.PHONY: demo test test-heavy lint docs bench lock test-latest test-oldest clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BASE): $(BIN)/python setup.cfg pyproject.toml $(LOCK)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c $(LOCK) -e .
	touch $(BASE)

$(DEV): $(BASE)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev,gpu,diffusion]"
	touch $(DEV)

demo: $(BASE)
	$(BIN)/uniprobe demo

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the API reference and guides (docs/, mkdocs.yml) into build/site/; warnings (docstring problems too) fail it
docs: $(DEV)
	$(BIN)/mkdocs build --strict --site-dir build/site

test: lint docs
	$(BIN)/python -m pytest -q -m "not heavy"

# the README's multi-minute commands, verbatim (tests/test_readme.py HEAVY): ~15 min on 2 cores
test-heavy: $(DEV)
	$(BIN)/python -m pytest -q -m heavy tests/test_readme.py

bench: $(DEV)
	$(BIN)/python experiments/bench/probes.py
	$(BIN)/python experiments/bench/patching.py

lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q ".[dev,gpu,diffusion]"
	{ echo "# The lock: exact versions of every package make test / make demo install (make lock)."; \
	  echo "# torch is installed first as $(TORCH); regenerated $$(date -u +%F) with $$(.venv-lock/bin/python -V)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -iv '^uniprobe' | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf .venv-lock build
	@echo "wrote $(LOCK); run 'make test' before committing it"

test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q $(TORCH)
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,gpu,diffusion]"
	.venv-latest/bin/python -c "$(VERSIONS)"
	.venv-latest/bin/python -m pytest -q -m "not slow"

test-oldest:
	test -x .venv-oldest/bin/python || $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q $(TORCH)
	.venv-oldest/bin/python -m pip install -q -c $(OLDEST) -e ".[dev,gpu,diffusion]"
	.venv-oldest/bin/python -c "$(VERSIONS)"
	.venv-oldest/bin/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-lock
