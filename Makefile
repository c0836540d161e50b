# The two commands that matter: `make run` (set up + serve) and `make test` (set up + suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONSTRAINTS := constraints.txt
# Port's Ocean framework for the end-to-end test (tests/test_ocean.py): it needs pydantic 1,
# so it gets a virtualenv of its own.
OCEAN_VENV := .venv-ocean
OCEAN_REQUIREMENTS := tests/ocean_integration/requirements.txt
OCEAN_CONSTRAINTS := tests/ocean_integration/constraints.txt
OCEAN_STAMP := $(OCEAN_VENV)/.installed-stamp
# Current Ocean (port-ocean 0.56, tests/test_ocean_current.py) needs Python >= 3.12: its
# virtualenv is made with OCEAN_CURRENT_PYTHON when given, else the first of these that runs
# and is at least 3.12 (pyenv's shims are on PATH even when they cannot run).
OCEAN_CURRENT_VENV := .venv-ocean-current
OCEAN_CURRENT_REQUIREMENTS := tests/ocean_current/requirements.txt
OCEAN_CURRENT_CONSTRAINTS := tests/ocean_current/constraints.txt
OCEAN_CURRENT_STAMP := $(OCEAN_CURRENT_VENV)/.installed-stamp
OCEAN_CURRENT_PYTHON ?=
OCEAN_CURRENT_CANDIDATES := python3.12 python3.13 python3.14 \
	$(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python) \
	$(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python) \
	$(wildcard $(HOME)/.pyenv/versions/3.14*/bin/python)
SRC := app tests bench migrations

.PHONY: install install-ocean install-ocean-current run test lint typecheck openapi openapi-check pytest bench fmt clean

# Installs take the versions CI tested: every package is pinned by a constraints file in
# the repository (upgrades are deliberate: change the pin, run `make test`, commit both).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev,embedded]'
	touch $(STAMP)

$(OCEAN_STAMP): $(OCEAN_REQUIREMENTS) $(OCEAN_CONSTRAINTS)
	$(PYTHON) -m venv $(OCEAN_VENV)
	$(OCEAN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OCEAN_VENV)/bin/python -m pip install --quiet -c $(OCEAN_CONSTRAINTS) -r $(OCEAN_REQUIREMENTS)
	touch $(OCEAN_STAMP)

# The constraints were frozen on Python 3.12: `pip freeze` of a virtualenv where only
# `port-ocean[cli]==0.56.2` was installed.
$(OCEAN_CURRENT_STAMP): $(OCEAN_CURRENT_REQUIREMENTS) $(OCEAN_CURRENT_CONSTRAINTS)
	@py=; for candidate in $(or $(OCEAN_CURRENT_PYTHON),$(OCEAN_CURRENT_CANDIDATES)); do \
		if "$$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
			py=$$candidate; break; \
		fi; \
	done; \
	if [ -z "$$py" ]; then \
		echo "error: port-ocean 0.56 (tests/test_ocean_current.py) needs Python >= 3.12;" \
			"none of these is a Python >= 3.12 that runs: $(or $(OCEAN_CURRENT_PYTHON),$(OCEAN_CURRENT_CANDIDATES))." \
			"Install Python 3.12 or set OCEAN_CURRENT_PYTHON=/path/to/python3.12" >&2; \
		exit 1; \
	fi; \
	echo "$(OCEAN_CURRENT_VENV): $$("$$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"; \
	"$$py" -m venv --clear $(OCEAN_CURRENT_VENV)
	$(OCEAN_CURRENT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OCEAN_CURRENT_VENV)/bin/python -m pip install --quiet -c $(OCEAN_CURRENT_CONSTRAINTS) -r $(OCEAN_CURRENT_REQUIREMENTS)
	touch $(OCEAN_CURRENT_STAMP)

install: $(STAMP)

## Port's Ocean in .venv-ocean, for the suite's end-to-end test (make test installs it).
install-ocean: $(OCEAN_STAMP)

## Current Ocean (port-ocean 0.56, Python >= 3.12) in .venv-ocean-current (make test installs it).
install-ocean-current: $(OCEAN_CURRENT_STAMP)

## Set up and serve on 127.0.0.1:8000 (embedded PostgreSQL/Redis unless URLs are set).
run: install
	$(BIN)/portolan up

## Set up and run the whole suite: lint, types, OpenAPI freshness, pytest (+ API fuzzing).
test: install install-ocean install-ocean-current lint typecheck openapi-check pytest

lint:
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

typecheck:
	$(BIN)/mypy

openapi-check:
	$(BIN)/portolan openapi --check

pytest:
	$(BIN)/pytest

openapi: install
	$(BIN)/portolan openapi

bench: install
	$(BIN)/python -m bench

fmt: install
	$(BIN)/ruff format $(SRC)
	$(BIN)/ruff check --fix $(SRC)

clean:
	rm -rf $(VENV) $(OCEAN_VENV) $(OCEAN_CURRENT_VENV) .portolan .pytest_cache .mypy_cache .ruff_cache
