# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
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
	$(BIN)/ruff check gateway tests bench scripts
	$(BIN)/ruff format --check gateway tests bench scripts

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest --cov=gateway --cov-report=term --cov-fail-under=$(COV_FLOOR)

test: lint typecheck pytest

# The sandbox on 127.0.0.1:8090, the gateway on 127.0.0.1:8080 (admin 9091); see config/demo.toml.
demo: venv
	$(BIN)/python scripts/demo.py --config config/demo.toml

bench: venv
	bash bench/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .hypothesis
