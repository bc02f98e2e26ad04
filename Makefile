# NetKV: `make run` runs the main job, `make test` runs lint, type checks and all tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TRACE ?= ../shared/data/mooncake_conversation_trace.jsonl
PYTEST_ARGS ?=

.PHONY: help venv run test lint typecheck unit integration sim bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed ## create .venv and install netkv with its dev extras

run: ## the main job: install redis/mosquitto if missing, make the venv, run `netkv up --demo`
	scripts/ensure-servers.sh
	$(MAKE) venv
	$(BIN)/netkv up --demo --trace $(TRACE)

lint: venv ## ruff
	$(BIN)/ruff check .

typecheck: venv ## mypy --strict
	$(BIN)/mypy

test: lint typecheck ## lint, type checks, then every test tier
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; \
	exit $$rc

unit: venv ## only the pure tests
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

clean: ## remove the venv and results
	rm -rf $(VENV) results .mypy_cache .pytest_cache .ruff_cache
