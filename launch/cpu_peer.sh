#!/usr/bin/env bash
# This project's trainer against Lightning's Trainer on the CPU, side by side: the same network (ResNet-18,
# 7x7 stem, 28x28: configs/cpu.yaml), the same global batch over the same number of gloo ranks, fp32, the
# training set in memory and no DataLoader workers on either side, so that both measure the training step.
#
#   bash launch/cpu_peer.sh            # 3 interleaved rounds of: ours (bench), Lightning, ours (training run)
#   RANKS=1 ROUNDS=5 STEPS=30 bash launch/cpu_peer.sh
#
# Each round runs, one after the other:
#   ours_bench  `python -m resnet_dist.bench --mode trainer` (torchrun for RANKS > 1): the step (data, compute,
#               all-reduce wait) and nothing around it;
#   lightning   launch/peer_lightning_cpu.py: Lightning's Trainer (accelerator=cpu, devices=RANKS, strategy ddp,
#               precision 32-true), timed from its rank 0 over STEPS steps after WARMUP;
#   ours_train  `python -m resnet_dist.train` for 1 + STEPS/10 intervals of 10 steps: images/s of the training
#               log after the first interval, everything a real run does per step included (the preemption
#               agreement, the metrics).
# The figures only mean something on a quiet machine: before each run it waits (up to QUIET_WAIT_S, default
# 600) for the CPU to be at least 90% idle for QUIET_S (5) seconds on end, and a run during which other
# programs took more than BUSY_PCT% (default 5) of the machine runs again, up to RETRIES (3) more times
# (launch/cpu_others.py; disturbance.txt lists every try). Results in $OUT (default: a new
# /tmp/resnet_dist_cpu_peer.XXXX): each run's output and JSON, the training runs' metrics.jsonl, and summary.md
# (every raw figure, the medians, and each against Lightning's median).
#
# Lightning is no dependency of this project: it is installed into its own virtual environment
# (${LVENV:-.lightning-venv}, created when missing: python3 -m venv + pip install lightning and the torch
# version of the project's interpreter), which runs this repository's code from PYTHONPATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
PY=${PYTHON:-.venv/bin/python}
LVENV=${LVENV:-.lightning-venv}
OUT=${OUT:-$(mktemp -d /tmp/resnet_dist_cpu_peer.XXXX)}
RANKS=${RANKS:-2}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-3}
QUIET_S=${QUIET_S:-5}
QUIET_WAIT_S=${QUIET_WAIT_S:-600}
BUSY_PCT=${BUSY_PCT:-5}
RETRIES=${RETRIES:-3}
DATA=${DATA:-data}
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 CPU_OTHERS_MARK=$$  # launch/cpu_others.py: our processes

if [ ! -x "$LVENV/bin/python" ]; then
  torch_version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
  echo "installing lightning into $LVENV (torch $torch_version)" >&2
  python3 -m venv "$LVENV"
  "$LVENV/bin/pip" install -q "torch==$torch_version" lightning numpy pyyaml
fi

# quiet: wait until the CPU was >= 90% idle for QUIET_S seconds on end (or QUIET_WAIT_S passed: say so, go on)
quiet() {
  local waited=0 a b idle
  while :; do
    read -r -a a < <(head -1 /proc/stat); sleep "$QUIET_S"; read -r -a b < <(head -1 /proc/stat)
    idle=$(( (b[4] - a[4]) * 100 / ( (b[1]+b[2]+b[3]+b[4]+b[5]+b[6]+b[7]) - (a[1]+a[2]+a[3]+a[4]+a[5]+a[6]+a[7]) + 1 ) ))
    [ "$idle" -ge 90 ] && return 0
    waited=$((waited + QUIET_S))
    if [ "$waited" -ge "$QUIET_WAIT_S" ]; then echo "warning: the CPU is busy (${idle}% idle): measuring anyway" >&2; return 0; fi
  done
}

launch() {  # launch MODULE ARGS...: under torchrun for several ranks
  if [ "$RANKS" -gt 1 ]; then
    "$PY" -m torch.distributed.run --nproc_per_node="$RANKS" --rdzv-backend=c10d --rdzv-endpoint=localhost:0 -m "$@"
  else
    "$PY" -m "$@"
  fi
}

# measured NAME FUNCTION ARGS...: run it once the CPU is quiet; again (up to RETRIES more times) when other
# programs took more than BUSY_PCT% of the machine meanwhile (launch/cpu_others.py), its files kept aside
# as NAME.*.disturbedN; every try's share goes to disturbance.txt
measured() {
  local name=$1 try share f
  shift
  for try in $(seq 0 "$RETRIES"); do
    quiet
    "$PY" launch/cpu_others.py $$ > "$OUT/.snapshot"
    "$@"
    if share=$("$PY" launch/cpu_others.py $$ "$OUT/.snapshot" "$BUSY_PCT"); then
      echo "$name try $try: other programs took $share% of the CPU" >> "$OUT/disturbance.txt"
      return 0
    fi
    echo "$name try $try: other programs took $share% of the CPU: run again" >> "$OUT/disturbance.txt"
    if [ "$try" -lt "$RETRIES" ]; then
      for f in "$OUT/$name".txt "$OUT/$name".json "$OUT/$name".jsonl; do [ -e "$f" ] && mv "$f" "$f.disturbed$try"; done
    fi
  done
  echo "warning: $name: the CPU stayed busy; its figure comes from a disturbed run" >&2
}

recipe=(--config configs/cpu.yaml "train.batch_size=$BATCH" "data.root=$DATA")
train_steps=$(( 10 + STEPS ))
ours_bench() {
  launch resnet_dist.bench --mode trainer --steps "$STEPS" --warmup "$WARMUP" --out "$OUT/ours_bench_$1.json" \
    "${recipe[@]}" > "$OUT/ours_bench_$1.txt" 2>&1
}
lightning() {
  PYTHONPATH=$REPO "$LVENV/bin/python" launch/peer_lightning_cpu.py "$DATA" "$RANKS" "$BATCH" "$STEPS" "$WARMUP" \
    > "$OUT/lightning_$1.txt" 2>&1
  grep '^{"peer"' "$OUT/lightning_$1.txt" > "$OUT/lightning_$1.json"
}
ours_train() {
  rm -rf "$OUT/runs"
  launch resnet_dist.train "${recipe[@]}" train.epochs=1 "data.train_subset=$(( train_steps * BATCH ))" \
    data.test_subset=1024 log.every_steps=10 log.progress=lines checkpoint.resume=never \
    "run.dir=$OUT/runs" "run.name=train_$1" > "$OUT/ours_train_$1.txt" 2>&1
  cp "$OUT/runs/train_$1/metrics.jsonl" "$OUT/ours_train_$1.jsonl" && rm -rf "$OUT/runs"  # no checkpoints kept
}
rm -f "$OUT/disturbance.txt"
for r in $(seq 1 "$ROUNDS"); do
  measured "ours_bench_$r" ours_bench "$r"
  measured "lightning_$r" lightning "$r"
  measured "ours_train_$r" ours_train "$r"
done

"$PY" - "$OUT" "$ROUNDS" "$RANKS" "$BATCH" <<'PYEOF' | tee "$OUT/summary.md"
import json, statistics, sys, pathlib
out, rounds, ranks, batch = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def ours_train(r):  # images/s over the log intervals after the first
    recs = [json.loads(line) for line in (out / f"ours_train_{r}.jsonl").read_text().splitlines()]
    steps = [x for x in recs if x["kind"] == "step"]
    secs = sum((b["step"] - a["step"]) * batch / b["images_per_s"] for a, b in zip(steps, steps[1:]))
    return (steps[-1]["step"] - steps[0]["step"]) * batch / secs
figures = {
    "ours_bench": [json.loads((out / f"ours_bench_{r}.json").read_text())["images_per_s"] for r in range(1, rounds + 1)],
    "lightning": [json.loads((out / f"lightning_{r}.json").read_text())["images_per_s"] for r in range(1, rounds + 1)],
    "ours_train": [ours_train(r) for r in range(1, rounds + 1)],
}
print(f"{ranks} rank(s), global batch {batch}: images/s per round, median, and against Lightning's median\n")
print("| run | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " | median | vs Lightning |")
print("| --- " * (rounds + 3) + "|")
ref = statistics.median(figures["lightning"])
for name, xs in figures.items():
    m = statistics.median(xs)
    print(f"| {name} | " + " | ".join(f"{x:.0f}" for x in xs) + f" | {m:.0f} | {m / ref:.3f}x |")
split = [json.loads((out / f"ours_bench_{r}.json").read_text())["step_ms"] for r in range(1, rounds + 1)]
print("\n" + (out / "disturbance.txt").read_text().replace("\n", "  \n"))
print("\nours_bench step split, ms (data / compute / all-reduce wait / total): "
      + "; ".join(f"{s['data']:.1f} / {s['compute']:.1f} / {s['allreduce_wait']:.1f} / {s['total']:.1f}" for s in split))
PYEOF
