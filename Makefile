# One command sets up and runs the main job (`make demo`); one runs the tests (`make test`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export OPENBLAS_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1

.PHONY: venv demo train evaluate features serve bench-features bench-serve bench slo-gate isolation-check test lint redis clean

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

features: venv redis
	$(BIN)/recserve features apply
	$(BIN)/recserve features materialize

serve: venv redis
	$(BIN)/recserve serve

bench-serve: venv
	$(BIN)/python loadtests/sequential.py

# The four-system benchmark (about 25 minutes; it prints its estimate); results in reports/bench, see docs/benchmarks.md.
bench: venv redis
	$(BIN)/python loadtests/bench.py

# CI's SLO gate: each topology under locust at a fixed rate; trains a bundle first when there is none.
slo-gate: venv redis
	$(BIN)/python loadtests/gate.py

# CI's isolation check: `make test` beside a running demo; the demo must still answer afterwards.
isolation-check: venv redis
	$(BIN)/python loadtests/isolation.py -- $(MAKE) test

bench-features: venv redis
	$(BIN)/recserve features bench

demo: venv redis
	$(BIN)/recserve train
	$(BIN)/recserve evaluate
	$(BIN)/recserve features apply
	$(BIN)/recserve features materialize
	$(BIN)/recserve serve

# The container files too: hadolint at zero warnings, compose.yaml against the Compose spec's schema (vendored: offline).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec compose.yaml

test: venv redis lint
	$(BIN)/python -m pytest tests

clean:
	rm -rf artifacts reports .pytest_cache .ruff_cache feature_repo/data
