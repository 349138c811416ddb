# The two commands: `make report` and `make test`. Both create .venv on first use and reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= report

.PHONY: report test setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

report: setup
	$(BIN)/landscape report --out $(OUT)

test: setup-test
	XLA_FLAGS="--xla_force_host_platform_device_count=8" $(BIN)/python -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
