# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_PORT ?= 8080
SANDBOX_PORT ?= 8090
COV_FLOOR ?= 90

.PHONY: venv test lint typecheck pytest demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest --cov=gateway --cov-report=term --cov-fail-under=$(COV_FLOOR)

test: lint typecheck pytest

demo: venv
	$(BIN)/python -m gateway.demo --config config/demo.toml --port $(DEMO_PORT) --sandbox-port $(SANDBOX_PORT)

bench: venv
	bash bench/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
