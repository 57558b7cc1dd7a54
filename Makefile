# One command per job; each creates the virtual environment first if it is missing.
#   make quickstart   set up, then pretrain a tiny base (cached) and teach it a skill with LoRA
#   make test         set up, then run the test suite (what CI runs)
#   make test-slow    the tests marked slow

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# On machines without CUDA this pin resolves to the CPU wheel (a bare `torch` would pull
# the multi-GB CUDA build). Override for GPUs, e.g. `make setup TORCH_SPEC='torch==2.13.0'`
# with your CUDA index configured in pip.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart test test-slow clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,quant,tracking]"
	touch $(STAMP)

# The base model is pretrained once by the full fine-tuning recipe and reused afterwards.
runs/quickstart-base/model/config.json: configs/quickstart-base.yaml | $(STAMP)
	$(BIN)/tunelab train configs/quickstart-base.yaml --overwrite

quickstart: $(STAMP) runs/quickstart-base/model/config.json
	$(BIN)/tunelab train configs/quickstart.yaml --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

clean:
	rm -rf runs .pytest_cache .hypothesis
