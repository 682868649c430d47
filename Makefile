# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8080
POLICY ?= policies/demo.yaml

.PHONY: run test lint bench clean

$(BIN)/triage: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-deps: $(BIN)/triage
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/triage
	$(BIN)/triage serve --policy $(POLICY) --host 127.0.0.1 --port $(PORT)

test: $(VENV)/.test-deps
	$(BIN)/ruff check gateway classifiers tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(VENV)/.test-deps
	$(BIN)/ruff check gateway classifiers tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
