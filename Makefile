# labelloop's front door. `make demo` runs the loop, `make test` proves it works.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
VENV_LS := .venv-ls
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-ls test test-unit lint format train serve label-configs bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(VENV_LS)/.installed:
	test -x $(VENV_LS)/bin/python || $(PYTHON) -m venv $(VENV_LS) || python3 -m venv $(VENV_LS)
	$(VENV_LS)/bin/pip install -q "label-studio==1.23.2"
	touch $@

install: $(VENV)/.installed $(VENV_LS)/.installed  ## app venv + Label Studio's own venv

test: install  ## the whole suite, integration tests included
	$(PY) -m pytest -q

test-unit: $(VENV)/.installed
	$(PY) -m pytest -q -m "not integration"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

label-configs: $(VENV)/.installed  ## regenerate label_studio_config/*.xml from the taxonomy
	$(VENV)/bin/labelloop label-configs

train: $(VENV)/.installed  ## fine-tune on Davidson, register, promote through the gate
	$(VENV)/bin/labelloop train --dataset davidson
	$(VENV)/bin/labelloop promote

clean:
	rm -rf .pytest_cache .ruff_cache
