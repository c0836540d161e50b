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
SRC := app tests bench migrations

.PHONY: install install-ocean run test lint typecheck openapi openapi-check pytest bench fmt clean

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

install: $(STAMP)

## Port's Ocean in .venv-ocean, for the suite's end-to-end test (make test installs it).
install-ocean: $(OCEAN_STAMP)

## Set up and serve on 127.0.0.1:8000 (embedded PostgreSQL/Redis unless URLs are set).
run: install
	$(BIN)/portolan up

## Set up and run the whole suite: lint, types, OpenAPI freshness, pytest (+ API fuzzing).
test: install install-ocean lint typecheck openapi-check pytest

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
	rm -rf $(VENV) $(OCEAN_VENV) .portolan .pytest_cache .mypy_cache .ruff_cache
