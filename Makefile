# Two user targets: `make test` and `make repro`. Both bootstrap .venv when it is missing or older
# than pyproject.toml, so a new user on a fresh machine types exactly one command.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Hermetic, offline runs: nothing here may reach a hub or a tracker.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE := offline
export DVC_NO_ANALYTICS := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test repro lint venv clean

# bash with pipefail: a failed pip install (a full disk, say) must stop make here, before the stamp,
# not be hidden by the warning filter and surface later as "No module named pytest".
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(BIN)/python -c "import anystory, pipelines, training" 
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

lint: $(STAMP)
	$(BIN)/ruff check anystory pipelines training tests benchmarks

clean:
	rm -rf $(VENV)
