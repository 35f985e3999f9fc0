# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
COV_FLOOR ?= 90
# Checkov lives apart from the gateway's virtualenv: it pins many dependencies of its own.
CHECKOV_VENV ?= .venv-checkov
CHECKOV := $(CHECKOV_VENV)/bin/checkov --skip-download --compact --quiet

.PHONY: venv test lint typecheck pytest scan demo bench clean

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

# The Kubernetes examples and the Dockerfile through Checkov; any failed check fails the build.
# Skips are written next to what they skip (checkov.io/skipN annotations) with a reason.
# --skip-download: no call to the vendor's platform; the scan is local.
scan: $(CHECKOV_VENV)/.installed
	$(CHECKOV) --directory deploy --framework kubernetes
	$(CHECKOV) --file Dockerfile --framework dockerfile

$(CHECKOV_VENV)/.installed: .ci/checkov-requirements.txt
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet -r .ci/checkov-requirements.txt
	touch $@

test: lint typecheck scan pytest

# The sandbox on 127.0.0.1:8090, the gateway on 127.0.0.1:8080 (admin 9091); see config/demo.toml.
demo: venv
	$(BIN)/python scripts/demo.py --config config/demo.toml

bench: venv
	bash bench/run.sh

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .hypothesis
