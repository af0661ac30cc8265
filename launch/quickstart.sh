#!/usr/bin/env bash
# The README's first command: set up, then train the CPU quick-start recipe (or the GPU recipe
# when GPUs are present, with one process per GPU). Extra KEY=VALUE arguments are passed on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  n=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
  exec .venv/bin/torchrun --standalone --nproc_per_node="$n" -m resnet_dist.train --config configs/default.yaml "$@"
fi
exec .venv/bin/python -m resnet_dist.train --config configs/cpu.yaml "$@"
