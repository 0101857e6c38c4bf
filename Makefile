# Two commands do all the set-up: `make run` (install + the whole pipeline) and `make test` (install + tests).
PYTHON ?= python3.11
VENV ?= .venv
# Extra flags for `python -m venv`; `make VENV_FLAGS=--system-site-packages` reuses a torch you already have.
VENV_FLAGS ?=
# The CPU wheel on these machines; only installed when the environment has no torch at all.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin
# DVC runs each stage as `python -m tasks.<stage>`: that python must be the environment's
export PATH := $(abspath $(BIN)):$(PATH)

# Offline by default: nothing downloads weights or data at run time; no analytics.
export HF_HUB_OFFLINE ?= 1
export DVC_NO_ANALYTICS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install run test lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check latent_sft_core tasks flows bench tests

clean:
	rm -rf .scratch
