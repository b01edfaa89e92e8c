# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
# A CPU build of torch by default. On a GPU machine pass the CUDA build instead, e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Captions the bundled example images with the built-in model, embedded: SQLite and a local
# store under ./.loom, the worker engine in-process. No services needed.
demo: venv
	$(BIN)/loom caption examples/images --out captions.jsonl

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python bench/model_throughput.py
	$(BIN)/python bench/submit_throughput.py

clean:
	rm -rf $(VENV) .loom captions.jsonl
