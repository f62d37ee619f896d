#!/usr/bin/env bash
# Sets up .venv (CPU torch, pinned) if needed and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/python -m pytest tests -q -p no:cacheprovider -W ignore::DeprecationWarning
