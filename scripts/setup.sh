#!/usr/bin/env bash
# Create .venv in the repository root and install moetrain with its test extra.
# On a machine without CUDA the CPU wheel of torch is pinned first: pyproject's torch range then
# installs nothing more, whereas an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    # The CPU build by its local version: from a wheel mirror that has it, or else from
    # PyTorch's CPU index (PyPI's torch 2.13.0 for Linux is the CUDA build).
    .venv/bin/python -m pip install --quiet "torch==2.13.0+cpu" 2>/dev/null \
        || .venv/bin/python -m pip install --quiet "torch==2.13.0" \
            --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch, moetrain; print(f'moetrain ready: torch {torch.__version__}')"
