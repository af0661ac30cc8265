#!/usr/bin/env bash
# The CPU comparisons of BENCHMARKS.md, side by side in one run (same model, batch and precision):
#  (a) the original input pipeline (torchvision FashionMNIST + per-sample ToTensor + DataLoader, 4 workers)
#      against this project's on-device batches, both feeding the same step;
#  (b) 1 rank against 2 ranks (torchrun, gloo);
#  (c) the trainer against a bare forward/backward/step loop on fixed tensors (its overhead).
# Run on a quiet machine: `bash launch/cpu_bench.sh [KEY=VALUE ...]`; it prints the table BENCHMARKS.md holds,
# and keeps each run's JSON and text in ${OUT:-a new folder under /tmp}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d /tmp/resnet_dist_cpu_bench.XXXX)}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
common=(--steps "$STEPS" --warmup 3 train.batch_size=256 "$@")
one() { local name=$1; shift; "$@" --out "$OUT/$name.json" "${common[@]}" > "$OUT/$name.txt" 2>&1; }
one trainer_1rank      "$PY" -m resnet_dist.bench --mode trainer
one bare_1rank         "$PY" -m resnet_dist.bench --mode bare
one torchvision_1rank  "$PY" -m resnet_dist.bench --mode torchvision --workers 4
one trainer_2ranks     "$PY" -m torch.distributed.run --nproc_per_node=2 --rdzv-backend=c10d \
                         --rdzv-endpoint=localhost:0 -m resnet_dist.bench --mode trainer
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| run | ranks | images/s | per rank | data ms | compute ms | all-reduce wait ms | step ms |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name in ("torchvision_1rank", "trainer_1rank", "bare_1rank", "trainer_2ranks"):
    r = json.loads((out / f"{name}.json").read_text()); s = r["step_ms"]
    print(f"| {name} | {r['world_size']} | {r['images_per_s']:.0f} | {r['images_per_s_per_rank']:.0f} | {s['data']:.1f} | "
          f"{s['compute']:.1f} | {s['allreduce_wait']:.1f} | {s['total']:.1f} |")
PYEOF
