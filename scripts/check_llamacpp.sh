#!/usr/bin/env bash
# The llama.cpp check of GGUF exports: install the `gguf-check` extra (llama-cpp-python, built from
# source with the local compiler and cmake) into .venv, then run the tests marked `llamacpp`, which
# the default `pytest` run deselects. The build is the slow part (measured: ~38 min on 2 shared CPU
# cores, a few minutes on 16); pip caches the wheel, so later runs skip it.
#
#   scripts/check_llamacpp.sh [extra pytest args]        e.g. -k smollm2 -s
#
# Environment: VENV (default .venv), CMAKE_BUILD_PARALLEL_LEVEL (default: all cores),
# CMAKE_ARGS (default -DGGML_NATIVE=ON: tuned to this CPU; the wheel is not portable).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "no virtual environment at $VENV; run scripts/install.sh first (or set VENV)" >&2
  exit 1
fi
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}"
  start=$(date +%s)
  "$PY" -m pip install -e ".[gguf-check]"
  echo "llama-cpp-python built and installed in $(( $(date +%s) - start )) s"
fi
"$PY" -m pytest -q -m llamacpp tests/test_llamacpp.py "$@"
