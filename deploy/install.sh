#!/usr/bin/env bash
# Install fedmla and everything its test suite needs, on a fresh machine.
#
#   bash deploy/install.sh
#
# pyproject.toml asks for torch>=2.6 and flwr>=1.42,<2, so an environment that already
# has its own torch (a CUDA build, say) keeps it. When no torch is installed, this script
# installs torch 2.13.0 first: where pip can see the CPU wheel (a find-links directory, or
# the PyTorch CPU index given with PIP_INDEX_URL / PIP_EXTRA_INDEX_URL) it takes it, and
# the rest of the install then leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The dashboard's browser test drives Debian's Chromium (Playwright's own browser
# download is not used). Installed here when we can: as root with apt-get.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
    fi
else
    command -v chromium >/dev/null 2>&1 || echo "note: install Chromium (Debian: apt-get install chromium chromium-driver) for the dashboard browser test" >&2
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install -e ".[dev]"
