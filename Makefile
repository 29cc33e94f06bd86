# labelloop's front door. `make demo` runs the loop, `make test` proves it works.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
VENV_LS := .venv-ls
PY := $(VENV)/bin/python
CHROMIUM := /usr/bin/chromium
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install chromium test test-unit fuzz lint format train serve demo stop label-configs simulate bench load clean

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

test: install chromium  ## the whole suite, integration tests included
	$(PY) -m pytest -q

# Debian's chromium for tests/test_dashboard_browser.py (Playwright drives it; no `playwright install`).
# Installed only as root with apt-get; anywhere else, or if the install fails, that test skips and says why.
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser test (apt-get, ~30 s)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "chromium could not be installed: the browser test will be skipped"; \
	else echo "$(CHROMIUM) is missing and apt-get needs root: the browser test will be skipped"; fi

test-unit: $(VENV)/.installed
	$(PY) -m pytest -q -m "not integration"

# Longer fuzz runs than `make test` does; each line is one fuzzer, add more below.
FUZZ_EXAMPLES ?= 2000
API_FUZZ_EXAMPLES ?= 100
fuzz: $(VENV)/.installed  ## hostile input at length: the journal and webhook (hypothesis), every route (schemathesis)
	LABELLOOP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_journal_fuzz.py
	LABELLOOP_FUZZ_EXAMPLES=$(API_FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_api_fuzz.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

label-configs: $(VENV)/.installed  ## regenerate label_studio_config/*.xml from label_studio_config/taxonomies/*.toml
	$(VENV)/bin/labelloop label-configs

train: $(VENV)/.installed  ## fine-tune on Davidson, register, promote through the gate
	$(VENV)/bin/labelloop train --dataset davidson --promote

serve: $(VENV)/.installed  ## the ML backend + webhooks + retrain jobs (settings from LABELLOOP_* / labelloop.toml)
	$(VENV)/bin/labelloop serve

demo: install  ## Label Studio + MLflow UI + backend on 127.0.0.1, a few simulated rounds; Ctrl-C or `make stop`
	$(VENV)/bin/labelloop demo

stop:  ## stop what `make demo` started
	@if [ -x $(VENV)/bin/labelloop ]; then $(VENV)/bin/labelloop stop; else echo "nothing installed, nothing to stop"; fi

simulate: $(VENV)/.installed  ## offline learning curves, random vs uncertainty vs diversity
	$(VENV)/bin/labelloop simulate --dataset davidson --strategies random,entropy,margin,margin_kmeans --seeds 3 \
		--budget 2000 --step 100

bench: install  ## benchmarks: each writes its results under bench/results/
	$(PY) bench/serve_throughput.py
	$(PY) bench/al_round.py
	$(PY) bench/al_curves.py
	$(PY) bench/al_curves.py --datasets ethos_multilabel
	$(PY) bench/al_severity.py
	$(PY) bench/multilabel_thresholds.py
	$(PY) bench/train_davidson.py
	$(PY) bench/label_quality.py
	$(PY) bench/drift.py
	$(PY) bench/dashboard_load.py
	$(PY) bench/load.py
	$(PY) bench/scale.py
	$(PY) bench/al_levers.py
	$(PY) bench/al_transfer.py --seeds 5

load: $(VENV)/.installed  ## load benchmark: sustained load and 4x overload on a real `labelloop serve` (locust)
	$(PY) bench/load.py

clean:
	rm -rf .pytest_cache .ruff_cache
