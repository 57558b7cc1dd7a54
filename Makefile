# One command per job; each creates the virtual environment first if it is missing.
#   make quickstart   set up, then pretrain a tiny base (cached) and teach it a skill with LoRA
#   make test         set up, then run the test suite (what CI runs)
#   make test-slow    the tests marked slow
#   make bench        tunelab vs TRL + PEFT (LoRA, QLoRA, full), the levers and the scaling tables (about 1.5 h on 2 cores)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The torch release to install before the project (a bare `torch` dependency would
# otherwise be resolved by pip from PyPI, which on Linux means the multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Without an NVIDIA driver, ask PyTorch's CPU index first (PyPI's Linux torch wheel is the
# CUDA build); wheels already on the machine (pip find-links) are still used.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,https://download.pytorch.org/whl/cpu)

.PHONY: setup quickstart test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" \
	    $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple --timeout 15 --retries 1)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The base model is pretrained once by the full fine-tuning recipe and reused afterwards
# (rebuilt when its config, its data or the tiny-model builder changes).
runs/quickstart-base/model/config.json: configs/quickstart-base.yaml configs/data/quickstart/pretrain.jsonl \
                                        tunelab/models/tiny.py tunelab/data/synthetic.py | $(STAMP)
	$(BIN)/tunelab train configs/quickstart-base.yaml --overwrite

quickstart: $(STAMP) runs/quickstart-base/model/config.json
	$(BIN)/tunelab train configs/quickstart.yaml --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

# The measurements in bench/RESULTS.md, one after another (run them on an otherwise idle machine).
bench: $(STAMP)
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python bench/vs_trl.py
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python bench/vs_trl.py --variant qlora --steps 10 --reps 2
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python bench/vs_trl.py --variant full --steps 10 --reps 2
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python bench/vs_trl.py --levers --steps 15 --reps 3
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python bench/scaling.py --steps 4 --reps 3 > bench/scaling.jsonl.partial \
	    && mv bench/scaling.jsonl.partial bench/scaling-$$(date +%F).jsonl

clean:
	rm -rf runs .pytest_cache .hypothesis
