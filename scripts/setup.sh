#!/usr/bin/env bash
# Creates ./.venv with PyTorch and lmtrain (+ test tools and lm-evaluation-harness). Idempotent.
#
# torch is installed first and pinned to the CPU build on this project's machines (torch==2.13.0,
# a local wheel): a bare `torch` requirement would pull a multi-GB CUDA build. On a GPU node,
# install the CUDA build you want into .venv first (see README, "Running on a cluster"), or set
# TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128");
# an importable torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -U pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
  .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
.venv/bin/python -m pip install -q -e ".[test,harness]"
.venv/bin/python -c "import torch, lightning, transformers; print(f'torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}')"
