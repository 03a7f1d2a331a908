# Two commands do all set-up: `make demo` and `make test`. `make install` is the shared part.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean-work

install: $(STAMP)

$(STAMP): pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# facenet-pytorch pins torch<2.3, numpy<2 and Pillow<10.3; it works with the pinned stack.
	$(BIN)/python -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	$(BIN)/python -c "import torch, torchvision, facenet_pytorch, silero_vad, webdataset, prefect, mlflow; print('vaemo: environment ready, torch', torch.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/vaemo demo

test: install
	$(BIN)/python -m pytest

SRC ?= ../shared/media
bench: install
	$(BIN)/python benchmarks/ingest_bench.py $(SRC) --cores 1

clean-work:
	rm -rf vaemo-work
