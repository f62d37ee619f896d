#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and noiserefine installed editable.
# Usage: bash scripts/setup.sh        (idempotent; re-running only checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: anything that lets pip choose would pull CUDA packages.
python -m pip install -q -c constraints.txt torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[test]"
python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"noiserefine environment ready: torch {torch.__version__}")
PY
mkdir -p runs  # the (git-ignored) folder the README's commands write into
