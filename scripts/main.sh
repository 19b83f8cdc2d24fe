#!/usr/bin/env bash
# The main job: sets up .venv on a fresh machine, then simulates a small federation
# (three generated sites: healthy-only, AD-heavy, mixed) on the CPU with Flower's
# simulation engine and prints per-site healthy/AD results. Extra args are key=value
# overrides, e.g. `bash scripts/main.sh fl.rounds=5 train.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec .venv/bin/m2diff simulate "$@"
