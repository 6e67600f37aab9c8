#!/usr/bin/env bash
# Create .venv and install the package (with --test: plus the reference implementations the tests use).
# torch is pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
  pip install -q -e ".[test]"
  # open_clip's text tower is one of the independent reference models. Installed without its
  # dependencies: they include torchvision, which would replace the CPU torch wheel.
  pip install -q --no-deps "open-clip-torch==3.3.0"
else
  pip install -q -e .
fi
