#!/usr/bin/env bash
# One command for the GPU numbers (under 10 minutes on one GPU): the NCCL backend, bf16, the
# benchmark table in each mode, and the fast recipe trained to the end. Writes everything to
# ${OUT:-gpu_check}/ (JSON per benchmark, the training log, a summary.txt to paste into BENCHMARKS.md).
# Usage: bash launch/gpu_check.sh   (after `bash launch/setup.sh`; PYTHON overrides the interpreter)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-disabled}
summary="$OUT/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary" || { echo "no GPU"; exit 1; }
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
say "torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'), GPUs: $NGPU"

# NCCL: a real process group and all-reduce on every GPU (one rank per GPU)
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m resnet_dist.distributed --self-test \
  2>&1 | tee -a "$summary" | tail -1

bench() {  # bench NAME ARGS...: one benchmark, its table line and JSON
  local name=$1; shift
  "$PY" -m resnet_dist.bench --out "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2>&1 || { say "$name FAILED"; tail -5 "$OUT/$name.txt"; return; }
  say "$name: $("$PY" -c "import json,sys; r=json.load(open('$OUT/$name.json')); m=r['mfu']; print(f\"{r['images_per_s']:.0f} img/s, step {r['step_ms']['total']:.1f} ms (data {r['step_ms']['data']:.1f}), MFU {100*m:.1f}%\" if m else f\"{r['images_per_s']:.0f} img/s\")")"
}
S="--steps 50 --warmup 10"
bench default_bf16        --config configs/default.yaml $S
bench default_bare_bf16   --config configs/default.yaml --mode bare $S
bench default_fp32        --config configs/default.yaml $S train.precision=fp32
bench default_no_cl       --config configs/default.yaml $S train.channels_last=false
bench default_compiled    --config configs/default.yaml --steps 50 --warmup 30 train.compile=true
bench seed224_ours        --config configs/seed.yaml $S train.precision=bf16
bench seed224_torchvision --config configs/seed.yaml --mode torchvision --workers 8 $S train.precision=bf16
if [ "$NGPU" -gt 1 ]; then
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m resnet_dist.bench --config configs/default.yaml \
    --out "$OUT/default_ddp.json" $S > "$OUT/default_ddp.txt" 2>&1 && say "default on $NGPU GPUs: $(grep 'images/s total' "$OUT/default_ddp.txt")"
fi

# the fast recipe, trained to the end: final-epoch accuracy and wall time
start=$(date +%s)
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m resnet_dist.train --config configs/fast.yaml \
  run.dir="$OUT/runs" run.name=fast checkpoint.resume=never log.progress=lines > "$OUT/fast_train.log" 2>&1
say "fast.yaml: exit $?, $(( $(date +%s) - start )) s wall, last epoch: $(grep '^epoch' "$OUT/fast_train.log" | tail -1)"
echo "summary in $summary"
