#!/usr/bin/env bash
# GPU suite: DeepSpeed ZeRO-2/3 + FSDP bf16 fits for GPT and T5 on one GPU, export, generation,
# and GPT-2 124M under ZeRO-3. Sized for < 8 minutes on one H100. Needs a CUDA build of torch in
# .venv (see README "Running on a cluster"). Usage: bash tests/gpu/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
export WANDB_MODE=offline
python=${PYTHON:-.venv/bin/python}
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.cuda.get_device_name())"
exec "$python" -m pytest -m gpu tests/gpu -v --durations=0 "$@"
