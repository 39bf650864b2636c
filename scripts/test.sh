#!/usr/bin/env bash
# The test command: installs (idempotently), lints, runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
