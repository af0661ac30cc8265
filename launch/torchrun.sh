#!/usr/bin/env bash
# Single-node torchrun: one process per visible GPU, or 2 CPU processes (gloo) when there is none.
#
#   bash launch/torchrun.sh --config configs/default.yaml [KEY=VALUE ...]
#   NPROC=2 bash launch/torchrun.sh ...          (choose the process count)
#   PYTHON=/path/to/python bash launch/torchrun.sh ...   (default: the repository's .venv, else python3)
#
# The rendezvous binds a free port (localhost:0), so two runs on one machine never collide.
# Arguments go to `python -m resnet_dist.train` unchanged; relative paths stay relative to where you are.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

# visible GPUs without importing torch (seconds): CUDA_VISIBLE_DEVICES when set, else nvidia-smi
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
  gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c -v -e '^$' -e '^-1$' || true)
elif command -v nvidia-smi >/dev/null; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
else
  gpus=0
fi
if [ "$gpus" -gt 0 ]; then
  NPROC=${NPROC:-$gpus}
else
  NPROC=${NPROC:-2}
  # torchrun would set 1 thread per process: on CPU give each process its share of the cores
  cores=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}
fi

exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint=localhost:0 \
  -m resnet_dist.train "$@"
