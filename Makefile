# CNC Brain — `make help` lists the targets. Every target creates the virtualenv when it is missing.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[train,dev]"
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install cncbrain with all extras

demo: $(STAMP) ## the main job: run the embedded default
	$(BIN)/cncbrain demo

eval: $(STAMP) ## evaluate the baselines and the oracle on abilene (3 seeds; table, runs/eval.json, runs/eval.png)
	@mkdir -p runs
	$(BIN)/cncbrain eval --scenario abilene --seeds 3 --json runs/eval.json --plot runs/eval.png

test: $(STAMP) ## run the test suite (starts its own nats-server and gRPC servers) and the checks below
	$(BIN)/python -m pytest -q

check: $(STAMP) ## the static checks alone (tests/test_checks.py runs them in `make test`): ruff, mypy, import layers
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

protos: $(STAMP) ## regenerate cnc/ (Python code of proto/) after editing a .proto
	$(BIN)/python -m cncbrain.protogen

proto-lint: ## buf lint of proto/ (needs npx or buf on PATH)
	cd proto && (command -v buf >/dev/null && buf lint || npx --yes @bufbuild/buf lint)

bench: $(STAMP) ## run the benchmarks (slow; prints figures)
	$(BIN)/python -m benchmarks

.PHONY: help venv demo eval test check bench protos proto-lint
