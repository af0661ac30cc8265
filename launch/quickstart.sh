#!/usr/bin/env bash
# The README's first command: set up, then train. On a machine with GPUs: configs/default.yaml with one
# process per GPU (launch/torchrun.sh); on CPU: the quick-start recipe configs/cpu.yaml in one process.
# Extra KEY=VALUE arguments are passed on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
if .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  exec bash launch/torchrun.sh --config configs/default.yaml "$@"
fi
exec .venv/bin/python -m resnet_dist.train --config configs/cpu.yaml "$@"
