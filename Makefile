# One command sets up and runs the main job (`make demo`); one runs the tests (`make test`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export OPENBLAS_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1

.PHONY: venv demo train evaluate test lint redis clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

redis:
	@deploy/ensure-redis.sh

train: venv
	$(BIN)/recserve train

evaluate: venv
	$(BIN)/recserve evaluate

demo: venv
	$(BIN)/recserve train
	$(BIN)/recserve evaluate

lint: venv
	$(BIN)/ruff check models pipeline tests
	$(BIN)/ruff format --check models pipeline tests

test: venv redis lint
	$(BIN)/python -m pytest tests

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
