#!/usr/bin/env bash
# Every test marked `gpu`, on a machine with a CUDA GPU, in one go (bounded at 8 minutes; not
# yet timed on a GPU): the PPO graph on a CUDA device worker under ZeRO 0-3 with a save and
# restore, the vLLM engine's sleep/wake with fresh weights, the group estimators on CUDA
# tensors, and `relay train` with every role on one GPU. Tests that need two GPUs (NCCL
# between device workers) skip themselves on one.
#
#   bash tests/gpu/run_gpu_checks.sh [pytest options]
#
# PYTHON picks the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print('GPUs:', torch.cuda.device_count(), torch.cuda.get_device_name(0))"
exec timeout 480 "$PY" -m pytest -q -m gpu tests -rs "$@"
