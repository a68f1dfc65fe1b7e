# Quick start: `make run` (default grid) and `make test` (test suite). Both install what they need first.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hfprune-installed
CONFIG ?= config/default.yaml
CORES ?= all
GPUS ?= 0
PYTEST_ARGS ?=

.PHONY: install run dry-run test test-fast lint bench clean-results gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/assets.txt scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

run: install
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPUS) --configfile $(CONFIG) --workflow-profile profiles/local

dry-run: install
	$(BIN)/snakemake -n --cores $(CORES) --resources gpu=$(GPUS) --configfile $(CONFIG) --workflow-profile profiles/local

test: install
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow and not workflow and not slurm" $(PYTEST_ARGS)

# the GPU path against the CPU path (docs/GPU.md); uses the installed venv and never installs
gpu-check:
	@test -x $(BIN)/python || { echo "gpu-check: no venv at $(VENV): run make install first"; exit 2; }
	$(BIN)/python scripts/gpu_check.py $(GPU_CHECK_ARGS)

lint: install
	$(BIN)/ruff check hfprune tests benchmarks
	$(BIN)/snakemake --lint --configfile $(CONFIG)

clean-results:
	rm -rf results/*/ results/mlflow.db results/mlflow.db.lock .snakemake
