# The two commands that matter: `make run` (set up + serve) and `make test` (set up + suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SRC := app tests bench migrations

.PHONY: install run test lint typecheck openapi openapi-check pytest bench fmt clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

install: $(STAMP)

## Set up and serve on 127.0.0.1:8000 (embedded PostgreSQL/Redis unless URLs are set).
run: install
	$(BIN)/portolan up

## Set up and run the whole suite: lint, types, OpenAPI freshness, pytest (+ API fuzzing).
test: install lint typecheck openapi-check pytest

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
	rm -rf $(VENV) .portolan .pytest_cache .mypy_cache .ruff_cache
