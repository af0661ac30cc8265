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
source "$REPO/launch/common.sh"
local_procs

exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint=localhost:0 \
  -m resnet_dist.train "$@"
