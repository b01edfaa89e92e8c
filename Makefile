# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
# A CPU build of torch by default. On a GPU machine pass the CUDA build instead, e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The chat VLMs whose processors need torchvision (Qwen2-VL/2.5-VL, SmolVLM; every one then gets
# torchvision's image processors): PyPI's torchvision does not import beside the CPU torch above,
# so their tests (tests/pipeline/test_hf_chat_vision.py) run in a venv of their own, with the
# torch + torchvision pair that lies on this kind of machine's disk. CI runs them (make test with
# CI=true or LOOM_TEST_VISION=1); elsewhere they are skipped, as pytest says.
VISION_VENV ?= .venv-vision
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1
VISION_STAMP := $(VISION_VENV)/.installed

.PHONY: venv demo test test-vision bench clean

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
	@if [ "$${CI:-}" = true ] || [ -n "$${LOOM_TEST_VISION:-}" ]; then $(MAKE) test-vision; fi

$(VISION_STAMP): pyproject.toml
	$(PY) -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/python -m pip install -q --upgrade pip
	$(VISION_VENV)/bin/python -m pip install -q $(VISION_TORCH)
	$(VISION_VENV)/bin/python -m pip install -q "transformers==$$($(BIN)/python -c 'import transformers; print(transformers.__version__)')" \
	  pillow safetensors numpy num2words "pytest>=8" "pytest-timeout>=2.3"
	touch $(VISION_STAMP)

# Only pipeline/ (pure PyTorch) is imported there: PYTHONPATH instead of installing Loom.
test-vision: venv $(VISION_STAMP)
	PYTHONPATH=$(CURDIR) $(VISION_VENV)/bin/python -m pytest -p no:cacheprovider \
	  tests/pipeline/test_hf_chat_vision.py

bench: venv
	$(BIN)/python bench/model_throughput.py
	$(BIN)/python bench/submit_throughput.py

clean:
	rm -rf $(VENV) $(VISION_VENV) .loom captions.jsonl
