# NetKV: `make run` runs the main job, `make test` runs lint, type checks and all tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A Mooncake-format trace for `make run`; empty: the embedded, seeded workload (netkv trace synth).
TRACE ?=
PYTEST_ARGS ?=

.PHONY: help setup venv run test lint typecheck unit integration sim bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml hatch_build.py $(wildcard netkv/routing/_*.c)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,peers]'
	touch $@

venv: $(BIN)/.installed ## create .venv and install netkv with its dev and peers extras

setup: ## install the Debian packages the tests need (as root; otherwise prints the command)
	scripts/setup.sh test

run: ## the main job: install redis/mosquitto if missing, make the venv, run `netkv up --demo`
	scripts/setup.sh run
	$(MAKE) venv
	$(BIN)/netkv up --demo $(if $(TRACE),--trace $(TRACE))

lint: venv ## ruff
	$(BIN)/ruff check .

typecheck: venv ## mypy --strict
	$(BIN)/mypy

test: setup lint typecheck ## lint, type checks, then every test tier
	@$(if $(TRACE),NETKV_TRACE=$(TRACE)) $(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; \
	exit $$rc

unit: venv ## only the pure tests
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

clean: ## remove the venv and results
	rm -rf $(VENV) results .mypy_cache .pytest_cache .ruff_cache
