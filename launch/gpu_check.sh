#!/usr/bin/env bash
# The GPU check: one command, on a bare GPU machine, within 8 minutes on one H200, cheap and decisive steps
# first; every figure judged against a stated bound (summary.txt: `| BOUND: PASS` / `FAIL`; exit 1 on any FAIL):
#   (1) the NCCL self-test, (2) a smoke run and its resume from step 10 ending exactly alike (bf16, fp16),
#   (3) configs/fast.yaml in bf16 (captured), fp16 and bf16 eager from one seed, (4) two ranks sharing the
#   GPU over gloo against `evaluate`, (5) the original 224x224 recipe to the end, (6) the trainer at per-GPU
#   batches 64-512, eager and captured, GPU busy and MFU, and a forecast of 2/4/8 GPUs, (7) configs/default.yaml
#   when it fits (GPU_CHECK_DEFAULT=1: always), (8) the original input pipeline against ours. Every step runs
#   under a timeout; what does not fit is skipped, and says so. GPU_CHECK_ONLY=smoke,fast runs some steps.
#
#   DATA=DIR bash launch/gpu_check.sh        DIR holds the four Fashion-MNIST .gz files (MD5-checked as always)
#
# No install needed: python3 with a CUDA torch (2.11 or newer), torchvision, numpy, pyyaml, tqdm and matplotlib
# is enough (no wandb: W&B is off here). The interpreter is $PYTHON, else .venv/bin/python, else python3; the
# package runs from this checkout. Get the data next to the checkout, from a machine that has Debian's copy:
#   mkdir -p gpu_data && cp /usr/share/datasets/fashion-mnist/*.gz gpu_data/    (then DATA=gpu_data)
# Output: at most 8 files in ${OUT:-gpu_check}: summary.txt (one line per figure), results.json and log
# tails; checkpoints and the prepared data go to ${GPU_CHECK_WORK:-/tmp/resnet_dist_gpu_check}.
# GPU_CHECK_DRY=1 runs the same logic on CPU with tiny sizes, in about two minutes (tests/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the script keeps its own deadline (GPU_CHECK_DEADLINE_S, default 480 s); this one only catches a hang in it
exec timeout --kill-after=15 "$(( ${GPU_CHECK_DEADLINE_S:-480} + 60 ))" "$PYTHON" launch/gpu_check.py
