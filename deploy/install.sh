#!/usr/bin/env bash
# Install fedmla and everything its test suite needs, on a fresh machine.
#
#   bash deploy/install.sh
#
# torch is pinned to 2.13.0 in pyproject.toml. Where pip can see the CPU wheel (a
# find-links directory, or the PyTorch CPU index given with PIP_INDEX_URL /
# PIP_EXTRA_INDEX_URL) it takes it; elsewhere on Linux it takes PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -e ".[dev]"
