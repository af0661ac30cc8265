"""The GPU check: what a first hour on a GPU machine must measure, most valuable first, within a deadline.

Run it through launch/gpu_check.sh (which picks the interpreter and puts the checkout on PYTHONPATH).
Every step is a subprocess under its own timeout, cut to the time left; a step that does not fit is
skipped and says so. Writes at most 8 files to $OUT: summary.txt (one line per figure), results.json,
and the tails of the logs. Checkpoints and the prepared data stay in $GPU_CHECK_WORK, never in $OUT.

GPU_CHECK_DRY=1 runs the same logic on CPU with tiny sizes (the test suite does), so that it cannot rot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
OUT = Path(os.environ.get("OUT") or "gpu_check")
WORK = Path(os.environ.get("GPU_CHECK_WORK") or Path(tempfile.gettempdir()) / "resnet_dist_gpu_check")
DEADLINE_S = float(os.environ.get("GPU_CHECK_DEADLINE_S", "480"))  # the whole check: 8 minutes
START = time.monotonic()
RESERVE_S = 10  # kept back to write the results

# Dry mode: the same steps on CPU in seconds each (7x7 stem at 28x28, a few hundred images, a few steps, fp32:
# bf16 and fp16 run at a few images per second on CPUs without native support). Appended last, so they win.
TINY = (
    [
        "model.stem=imagenet",
        "data.train_subset=128",
        "data.test_subset=100",
        "train.batch_size=32",
        "data.eval_batch_size=100",
        "log.every_steps=2",
        "train.precision=fp32",
    ]
    if DRY
    else []
)
BENCH_STEPS = ["--steps", "2", "--warmup", "1"] if DRY else ["--steps", "50", "--warmup", "10"]

results: dict = {"dry_run": DRY, "steps": {}}
logs: dict[str, list[str]] = {}  # file name in OUT -> tails appended to it


def left() -> float:
    return DEADLINE_S - (time.monotonic() - START) - RESERVE_S


def say(line: str) -> None:
    print(line, flush=True)
    with open(OUT / "summary.txt", "a") as f:
        f.write(line + "\n")


def save_results() -> None:
    tmp = OUT / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(OUT / "results.json")
    for name, parts in logs.items():
        (OUT / name).write_text("\n".join(parts) + "\n")


def run(name: str, cmd: list[str], budget_s: float, log: str) -> tuple[int | None, str, float]:
    """Run one step under min(budget, time left); (exit code or None if it timed out/was skipped, output, seconds)."""
    limit = min(budget_s, left())
    if limit < 5:
        say(f"{name}: SKIPPED (no time left in the {DEADLINE_S:.0f} s deadline)")
        results["steps"][name] = {"status": "skipped"}
        return None, "", 0.0
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = (
            None,
            e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""),
        )
        say(f"{name}: TIMED OUT after {limit:.0f} s")
    secs = time.monotonic() - t0
    tail = "\n".join(out.splitlines()[-25:])
    logs.setdefault(log, []).append(f"==== {name} (exit {code}, {secs:.1f} s): {' '.join(cmd[1:])}\n{tail}")
    results["steps"][name] = {"exit": code, "seconds": round(secs, 2)}
    if code not in (0, None):
        say(f"{name}: FAILED (exit {code}); see {log}")
    save_results()
    return code, out, secs


def train_cmd(*args: str) -> list[str]:
    return [
        PY,
        "-m",
        "resnet_dist.train",
        *args,
        *TINY,
        f"data.root={WORK / 'data'}",
        f"run.dir={WORK / 'runs'}",
        "dist.timeout_s=60",
        "log.progress=lines",
        *DATA,
    ]


def epoch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("epoch ")]


def time_split(out: str) -> dict | None:
    m = re.search(r"time: training ([\d.]+) s, evaluation ([\d.]+) s, checkpoints ([\d.]+) s", out)
    return dict(zip(("train_s", "eval_s", "save_s"), map(float, m.groups()))) if m else None


def last_acc(out: str) -> float | None:
    m = re.findall(r"test loss [\d.]+ acc ([\d.]+)", out)
    return float(m[-1]) if m else None


# ---- the steps, most valuable first ------------------------------------------------------------------
def versions() -> None:
    import torch

    v = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        v["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    results["versions"] = v
    say(
        f"versions: torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, NCCL {v['nccl']}, "
        f"driver {v.get('driver')}, {v['gpus']} x {v['gpu']}{' (DRY RUN on CPU)' if DRY else ''}"
    )
    if not DRY and not torch.cuda.is_available():
        say("no GPU visible to torch: stopping (GPU_CHECK_DRY=1 runs the check's logic on CPU)")
        save_results()
        sys.exit(1)


def self_test() -> None:
    code, out, _ = run("selftest", [PY, "-m", "resnet_dist.distributed", "--self-test"], 90, "smoke.log")
    line = next((x for x in out.splitlines() if x.startswith("all_reduce self-test")), "")
    results["selftest"] = line
    if code == 0:
        say(f"selftest: {line}")


def smoke() -> None:
    """1 epoch on a subset with mid-epoch checkpoints, then a resume (in deterministic mode): GPU checkpoint
    loading, the fused optimizer's state, the CUDA random streams, run.deterministic's kernels; then the same
    under fp16 (GradScaler, foreach SGD)."""
    sub = [] if DRY else ["data.train_subset=8192", "data.test_subset=2000"]
    for prec in ("bf16", "fp16"):
        name = f"smoke_{prec}"
        if DRY and prec == "fp16":
            say(f"{name}: skipped in the dry run (it would repeat smoke_bf16: the dry run trains in fp32)")
            continue
        args = [
            "--config",
            "configs/fast.yaml",
            *sub,
            f"train.precision={prec}",
            "train.ema_decay=0.99",
            "checkpoint.every_steps=5",
            f"run.name=smoke-{prec}",
            "checkpoint.resume=auto",
        ]
        shutil.rmtree(WORK / "runs" / f"smoke-{prec}", ignore_errors=True)
        c1, o1, _ = run(f"{name}_first", train_cmd(*args, "train.epochs=1"), 150, "smoke.log")
        # the resume also runs deterministic kernels only: an op without one on this GPU would raise here
        c2, o2, _ = run(
            f"{name}_resume", train_cmd(*args, "train.epochs=2", "run.deterministic=true"), 150, "smoke.log"
        )
        ok = c1 == 0 and c2 == 0 and "resumed at step" in o2 and len(epoch_lines(o2)) == 1
        acc = last_acc(o2)
        results["steps"][name] = {"ok": ok, "test_acc": acc}
        say(f"{name}: {'OK' if ok else 'FAILED'}: 1 epoch, checkpoint, resume, 1 more epoch; test acc {acc}")


def bench(name: str, config: str, *args: str, steps=BENCH_STEPS, budget_s: float = 120) -> None:
    """One `python -m resnet_dist.bench` run (bf16 unless the dry run forces fp32), its line in the summary."""
    out_json = WORK / f"{name}.json"
    cmd = [PY, "-m", "resnet_dist.bench", "--config", config, *steps, "--out", str(out_json)]
    cmd += ["train.precision=bf16", *args, *TINY, f"data.root={WORK / 'data'}", *DATA]
    code, _, _ = run(name, cmd, budget_s, "bench.log")
    if code == 0:
        report_bench(name, json.loads(out_json.read_text()))


def throughput() -> None:
    """bf16 images/s of the trainer with and without EMA and of the bare loop, MFU against the datasheet
    and against a bf16 matrix product measured here."""
    bench("bench_trainer_ema", "configs/default.yaml")
    bench("bench_trainer_no_ema", "configs/default.yaml", "train.ema_decay=0")
    bench("bench_bare", "configs/default.yaml", "--mode", "bare")


def report_bench(name: str, r: dict) -> None:
    results["steps"][name].update(r)
    s = r["step_ms"]
    mfu = (
        f"{100 * r['mfu']:.1f}% of datasheet {r['peak_tflops_per_rank']}"
        if r.get("mfu")
        else "datasheet MFU n/a"
    )
    vs = (
        f"{100 * r['mfu_vs_matmul']:.1f}% of measured bf16 matmul {r['matmul_bf16_tflops']:.0f} TFLOP/s"
        if r.get("mfu_vs_matmul")
        else "matmul ceiling n/a"
    )
    say(
        f"{name}: {r['images_per_s']:.0f} img/s, step {s['total']:.2f} ms (data {s['data']:.2f}), first step "
        f"{r['first_step_s']:.2f} s, {r['achieved_tflops_per_rank']:.1f} TFLOP/s, {mfu}, {vs}"
    )


def recipe(name: str, config: str, budget_s: float) -> float | None:
    """A recipe trained to the end: final-epoch accuracy, wall time, time split."""
    shutil.rmtree(WORK / "runs" / name, ignore_errors=True)
    extra = ["train.epochs=2"] if DRY else []
    code, out, secs = run(
        name,
        train_cmd("--config", config, f"run.name={name}", "checkpoint.resume=never", *extra),
        budget_s,
        f"{name}.log",
    )
    if code != 0:
        return None
    acc, split = last_acc(out), time_split(out)
    results["steps"][name].update(
        test_acc=acc, wall_s=round(secs, 1), time_split=split, epochs=len(epoch_lines(out))
    )
    say(
        f"{name}: final-epoch test acc {acc}, {len(epoch_lines(out))} epochs, wall {secs:.1f} s "
        f"(process start and data included); split: training {split['train_s']} s, evaluation {split['eval_s']} s, "
        f"checkpoints {split['save_s']} s"
    )
    return secs


def compiled() -> None:
    """torch.compile: images/s, and the first step's time (the compilation)."""
    if DRY:
        say("bench_compiled: skipped in the dry run (compiling on CPU takes minutes)")
        results["steps"]["bench_compiled"] = {"status": "skipped"}
        return
    bench(
        "bench_compiled",
        "configs/default.yaml",
        "train.compile=true",
        budget_s=240,
        steps=["--steps", "50", "--warmup", "10"],
    )


def original_pipeline() -> None:
    """The original recipe's 224x224 input: torchvision's per-sample DataLoader against our on-device batches."""
    size = ["data.resize=56"] if DRY else []
    steps = ["--steps", "2", "--warmup", "1"] if DRY else ["--steps", "30", "--warmup", "5"]
    workers = ["--workers", "2" if DRY else "8"]
    bench("seed224_ours", "configs/seed.yaml", "--mode", "trainer", *workers, *size, steps=steps)
    bench("seed224_torchvision", "configs/seed.yaml", "--mode", "torchvision", *workers, *size, steps=steps)


UNTESTABLE = (
    "what one GPU cannot test: NCCL bandwidth between GPUs and nodes, DDP's gradient all-reduce overlap "
    "and the bf16 compression hook on NCCL, SyncBatchNorm across GPUs, cross-rank preemption agreement on "
    "NCCL, multi-node rendezvous; these need 2+ GPUs (launch/torchrun.sh, slurm/train.sh)"
)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.txt").write_text("")
    WORK.mkdir(parents=True, exist_ok=True)
    versions()
    self_test()
    smoke()
    throughput()
    fast_s = recipe("fast", "configs/fast.yaml", 180)
    # the default recipe is 40 epochs to fast's 12: run it only if it fits
    if DRY:
        say("default: skipped in the dry run (the same step as fast, with another config)")
    elif fast_s and left() > fast_s * 40 / 12 * 1.2 + 60:
        recipe("default", "configs/default.yaml", left() - 60)
    else:
        say(
            "default: skipped (does not fit in the time left)" if fast_s else "default: skipped (fast failed)"
        )
    compiled()
    original_pipeline()
    say(UNTESTABLE)
    results["untestable_on_one_gpu"] = UNTESTABLE
    results["seconds"] = round(time.monotonic() - START, 1)
    say(f"gpu_check: done in {results['seconds']} s")
    save_results()
    failed = [
        k for k, v in results["steps"].items() if v.get("exit") not in (0, None) or v.get("ok") is False
    ]
    return 1 if failed else 0


DATA = [f"data.mirror={os.environ['DATA']}"] if os.environ.get("DATA") else []

if __name__ == "__main__":
    sys.exit(main())
