#!/usr/bin/env bash
# The test command: sets up .venv (and nginx, which the tests start) on a fresh machine,
# lints, then runs the whole suite (real NIfTI files, real Flower processes on 127.0.0.1).
# Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/ensure-nginx.sh
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
.venv/bin/ruff check m2diff client server tests benchmarks
.venv/bin/python -m pytest "$@"
