#!/usr/bin/env bash
# One command from a fresh clone to a working `snapgen`: creates .venv and installs the
# project with the CPU torch wheel pinned (see constraints.txt). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and on its own, so that no other package's requirement can pull a CUDA build.
.venv/bin/pip install -q -c constraints.txt torch
# Every extra, for the tests: model (torch, diffusers, transformers), api (the HTTP API alone, no torch),
# serve (both). triton: nvidia-pytriton (a tritonserver binary the Triton tests start) and tritonclient;
# both keep numpy < 2. kernels: the Triton language, whose CPU interpreter tests/test_kernels.py runs.
.venv/bin/pip install -q -c constraints.txt -e '.[model,api,serve,train,export,triton,kernels,dev]'
.venv/bin/python -c "import torch, snapgen; print('snapgen', snapgen.__version__, '| torch', torch.__version__)"
