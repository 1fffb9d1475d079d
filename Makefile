# simgen: make help lists the targets.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Dataset defaults (override: make dataset CONFIG=my.yaml OUT=data/my.zarr)
CONFIG ?=
OUT    ?= data/default.zarr

.DEFAULT_GOAL := help
.PHONY: help install dataset test test-all test-cluster lint format bench calibrations gpu-check gpu-wheels clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: on a CPU machine this takes the CPU wheel; never a CUDA build.
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Build .venv and install the project (CPU torch on CPU machines)

dataset: $(STAMP) ## Generate the default labelled dataset (PRISM on GPU, calibrated incoherent model on CPU)
	$(BIN)/simgen generate $(if $(CONFIG),--config $(CONFIG),) -o $(OUT)
	$(BIN)/simgen preview $(OUT) -o $(OUT:.zarr=)_preview.png
	@echo "store:   $(OUT)"
	@echo "preview: $(OUT:.zarr=)_preview.png"

test: $(STAMP) ## Run the default test suite (fast; no GPU needed)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) ## Run every test including slow and gpu ones (gpu skip without CuPy)
	$(BIN)/python -m pytest -q -m ''

test-cluster: $(STAMP) ## Generate through a throwaway one-node SLURM (root; installs slurm-wlm, munge)
	@$(BIN)/python -c 'import dask_jobqueue' 2>/dev/null || $(BIN)/python -m pip install -q 'dask-jobqueue>=0.8'
	tests/slurm/with_slurm.sh $(BIN)/python -m pytest -q -m cluster tests/test_cluster_slurm.py

lint: $(STAMP) ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## Print benchmark tables (speed vs plain abTEM; not pass/fail)
	$(BIN)/python -m benchmarks.run

calibrations: $(STAMP) ## Rebuild the shipped incoherent-model calibrations and detector grids (~75 min, CPU)
	$(BIN)/python -m simgen.calibration_table simgen/data/calibrations.json

gpu-check: ## On a GPU machine: gpu tests + GPU figures beside the CPU ones (docs/gpu.md)
	bash benchmarks/gpu_check.sh

gpu-wheels: $(STAMP) ## Download (here) the wheels gpu-check installs on the GPU machine into .whl/
	PYTHON=$(BIN)/python bash benchmarks/fetch_gpu_wheels.sh

clean: ## Remove caches (keeps .venv and data/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
