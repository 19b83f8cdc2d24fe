#!/usr/bin/env bash
# Create .venv (once) and install m2diff-fl with its test extras into it.
# CPU path (dev, CI): torch is pinned to a CPU build first, so the registry's multi-GB CUDA
# build is never pulled in. Set TORCH_INDEX to a CPU wheel index where one is reachable
# (e.g. https://download.pytorch.org/whl/cpu); hospitals with GPUs use `pip install .`
# (see README, "Install on a GPU site").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.m2diff-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[bootstrap] installing into .venv (CPU torch: $TORCH_SPEC)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if [ -n "${TORCH_INDEX:-}" ]; then
    .venv/bin/python -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX"
  else
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
  fi
  .venv/bin/python -m pip install -q -e ".[test]" "$TORCH_SPEC"
  touch "$stamp"
fi
