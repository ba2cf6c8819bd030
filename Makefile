# Quick start: `make demo` (set up + run the main job), `make test` (set up + run the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow test-all
setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) scripts/main_job.py

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m 'slow and not manual' || [ $$? -eq 5 ]  # exit 5 = no slow tests collected

test-all: test test-slow
