# orca8k: `make demo` runs the whole pipeline on the embedded demo; `make test` runs the tests.
# Both install into .venv first (torch==2.13.0: the CPU wheel here, the CUDA build of 2.13.0 on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DVC_NO_ANALYTICS ?= 1
export GX_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install demo test lint bench clean-outputs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install
	PATH=$(abspath $(BIN)):$$PATH orca8k demo-data
	PATH=$(abspath $(BIN)):$$PATH dvc repro

test: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests flows benchmarks

bench: install
	for b in benchmarks/bench_*.py; do PATH=$(abspath $(BIN)):$$PATH $(BIN)/python $$b || exit 1; done

clean-outputs:
	rm -rf artifacts metrics reports runs mlflow.db mlartifacts
