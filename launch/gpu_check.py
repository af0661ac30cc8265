"""The GPU check: what a first hour on a GPU machine must measure, judged, most decisive first, within a deadline.

Run it through launch/gpu_check.sh (which picks the interpreter and puts the checkout on PYTHONPATH).
Every step is a subprocess under its own timeout, cut to the time left; a step that does not fit is
skipped and says so. Every figure is judged against a stated bound: its line in summary.txt ends in
`| BOUND: PASS` or `| BOUND: FAIL`, and the check exits 1 when any FAIL (a step that crashed or timed out
is a FAIL too). Writes at most 8 files to $OUT: summary.txt (one line per figure), results.json, and the
tails of the logs. Checkpoints and the prepared data stay in $GPU_CHECK_WORK, never in $OUT.

GPU_CHECK_DRY=1 runs the same logic on CPU with tiny sizes (the test suite does), judged against floors fit
for that tiny data, so that it cannot rot. GPU_CHECK_ONLY=step,step runs some steps only (their names are the
functions in STEPS); GPU_CHECK_DEFAULT=1 adds the 40-epoch recipe even when it would not fit the deadline.
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
ONLY = [s for s in os.environ.get("GPU_CHECK_ONLY", "").split(",") if s]
START = time.monotonic()
RESERVE_S = 10  # kept back to write the results

# What each figure must reach, on a GPU and in the dry run (CPU, a few hundred images: chance is 0.10).
# GPU_CHECK_BOUNDS='{"smoke": 1.01}' overrides some (the tests force a FAIL that way).
BOUNDS = {
    # the smoke recipe (SMOKE below) after 4 epochs of 16 steps on 8,192 images: measured 0.7785 in bf16 on a
    # CPU (python -m resnet_dist.train with SMOKE's settings, 2026-11-30). Not 2 epochs: after 32 steps the
    # BatchNorm running statistics still lag the weights (0.27 test accuracy where batch statistics give 0.73).
    # 0.70 leaves room for seeds and kernels; a collapsed run (the old smoke ended at 0.065) is far below
    "smoke": 0.70 if not DRY else 0.15,
    "fast": 0.940 if not DRY else 0.15,  # configs/fast.yaml's target
    "default": 0.953 if not DRY else 0.15,  # seeds 0 / 1 / 2 gave 0.9552 / 0.9550 / 0.9565 on one H200
    # the original recipe, 10 epochs: the notebook's figure is ~0.89 for one run; under a constant LR the last
    # epoch's accuracy swings by a point or two
    "seed224": 0.87 if not DRY else 0.15,
    # fp16 against bf16 on configs/fast.yaml, same seed: at most 0.5 points apart (bf16 seeds 0-2 of the
    # default recipe spread 0.15 points; widen only from a measured fp16 seed spread)
    "fp16_gap": 0.005 if not DRY else 0.0,
    # 2 ranks on one GPU (gloo): the logged test accuracy against `evaluate` on the checkpoint, in images (the
    # shard shapes differ, so one image may flip)
    "two_ranks_images": 1,
    # the captured step against the eager one on configs/fast.yaml, same seed (bf16): at most 0.3 points
    "captured_gap": 0.003 if not DRY else 0.0,
    # configs/fast.yaml's time, captured: training + evaluation, and the whole process (start, data, capture)
    "fast_train_eval_s": 10.0 if not DRY else 600.0,
    "fast_wall_s": 15.0 if not DRY else 600.0,
    # the trainer at batch 512 bf16 with EMA, captured (configs/default.yaml): images/s, GPU busy, MFU; and at
    # 128 per GPU (4 GPUs' share of 512) still busy
    "captured_512_images_s": 85_000,
    "busy_512": 0.90,
    "busy_128": 0.70,
    "mfu_512": 0.23,
    # a captured step must never be slower than the eager one at the same per-GPU batch (the dry run on a CPU
    # runs both eagerly, the same step timed twice on a machine that may be busy: any ratio)
    "captured_vs_eager_speed": 1.0 if not DRY else 0.0,
}
BOUNDS.update(json.loads(os.environ.get("GPU_CHECK_BOUNDS") or "{}"))

# Dry mode: the same steps on CPU in seconds each (7x7 stem at 28x28, a few hundred images, a few steps, fp32:
# bf16 and fp16 run at a few images per second on CPUs without native support). Appended last, so they win.
TINY = (
    [
        "model.stem=imagenet",
        "data.train_subset=256",
        "data.test_subset=200",
        "train.batch_size=32",
        "data.eval_batch_size=100",
        "log.every_steps=4",
        "train.precision=fp32",
        "train.lr=0.05",  # the recipes' peak LRs diverge in the few steps of so little data
    ]
    if DRY
    else []
)
# The smoke recipe: configs/fast.yaml on 8,192 images (16 steps per epoch) for 4 epochs, at a peak LR of 0.05
# with a quarter of warm-up: this network diverges at LRs of 0.08 and up in its first 10 steps (fast.yaml warms
# up over 281 steps; its lr 0.4 squeezed into 16 steps collapsed: loss 8, then ln 10), an EMA short enough for
# 64 steps, deterministic kernels only, a checkpoint every 10 steps.
SMOKE = [
    "--config",
    "configs/fast.yaml",
    *([] if DRY else ["data.train_subset=8192", "data.test_subset=2000"]),
    "train.epochs=4",
    "train.lr=0.05",
    "train.warmup=0.25",
    "train.ema_decay=0.9",
    "run.deterministic=true",
    "checkpoint.every_steps=10",
    "checkpoint.keep=12",
]
BENCH_STEPS = ["--steps", "2", "--warmup", "1"] if DRY else ["--steps", "50", "--warmup", "10"]

results: dict = {"dry_run": DRY, "steps": {}, "checks": {}}
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


def judge(name: str, what: str, value: float | None, op: str, bound: float) -> bool:
    """One figure against its bound: a summary line ending in `| op bound: PASS` (or FAIL)."""
    ok = value is not None and (value >= bound if op == ">=" else value <= bound)
    results["checks"][name] = {"value": value, "op": op, "bound": bound, "pass": ok}
    say(f"{name}: {what} | {op} {bound:g}: {'PASS' if ok else 'FAIL'}")
    return ok


def fail(name: str, why: str) -> None:
    """A step that could not produce its figure: a FAIL of its own."""
    results["checks"][name] = {"value": None, "pass": False, "why": why}
    say(f"{name}: {why} | FAIL")


def run(name: str, cmd: list[str], budget_s: float, log: str) -> tuple[int | None, str, float]:
    """Run one step under min(budget, time left): (exit code, or None if it timed out or was skipped; output;
    seconds). A crash or a timeout is a FAIL; a step skipped for lack of time is neither."""
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
        code = None
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        fail(name, f"TIMED OUT after {limit:.0f} s")
    secs = time.monotonic() - t0
    tail = "\n".join(out.splitlines()[-25:])
    logs.setdefault(log, []).append(f"==== {name} (exit {code}, {secs:.1f} s): {' '.join(cmd[1:])}\n{tail}")
    results["steps"][name] = {"exit": code, "seconds": round(secs, 2)}
    if code not in (0, None):
        fail(name, f"exit {code}; see {log}")
    save_results()
    return code, out, secs


def common(*args: str) -> list[str]:
    """What every training, evaluation and bench run of the check gets: the data, the work folder, TINY."""
    return [*args, *TINY, f"data.root={WORK / 'data'}", *DATA]


def train_cmd(*args: str, launcher: list[str] | None = None) -> list[str]:
    return [
        *(launcher or [PY]),
        "-m",
        "resnet_dist.train",
        *common(*args, f"run.dir={WORK / 'runs'}", "dist.timeout_s=60", "log.progress=lines"),
    ]


def epoch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("epoch ")]


def time_split(out: str) -> dict | None:
    m = re.search(r"time: training ([\d.]+) s, evaluation ([\d.]+) s, checkpoints ([\d.]+) s", out)
    return dict(zip(("train_s", "eval_s", "save_s"), map(float, m.groups()))) if m else None


def last_acc(out: str) -> float | None:
    m = re.findall(r"test loss [\d.]+ acc ([\d.]+)", out)
    return float(m[-1]) if m else None


def last_result(out: str) -> tuple[float, float] | None:
    """(test acc, test loss) of the last epoch line."""
    m = re.findall(r"test loss ([\d.]+) acc ([\d.]+)", out)
    return (float(m[-1][1]), float(m[-1][0])) if m else None


def amp_summary(out: str) -> str | None:
    m = re.search(r"fp16: \d+ of \d+ steps skipped.*", out)
    return m.group(0) if m else None


def fresh(name: str) -> str:
    shutil.rmtree(WORK / "runs" / name, ignore_errors=True)
    return f"run.name={name}"


# ---- the steps, most decisive first ------------------------------------------------------------------------
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
        fail("versions", "no GPU visible to torch (GPU_CHECK_DRY=1 runs the check's logic on CPU)")
        save_results()
        sys.exit(1)


def selftest() -> None:
    code, out, _ = run("selftest", [PY, "-m", "resnet_dist.selftest"], 90, "smoke.log")
    line = next((x for x in out.splitlines() if x.startswith("all_reduce self-test")), "")
    results["selftest"] = line
    if code == 0:
        say(f"selftest: {line}")


def smoke() -> None:
    """4 epochs on a subset with a checkpoint every 10 steps, then the same command resumed from the step-10
    checkpoint: it must end exactly where the uninterrupted run did (deterministic kernels: an op without one on
    this GPU would raise), above the smoke floor. GPU checkpoints, the optimizer's state, the CUDA random
    streams, the EMA; bf16, then fp16 (the loss scaler's state too)."""
    for prec in ("bf16", "fp16"):
        name = f"smoke_{prec}"
        args = [*SMOKE, f"train.precision={prec}", fresh(name)]
        c1, o1, _ = run(f"{name}_whole", train_cmd(*args, "checkpoint.resume=never"), 150, "smoke.log")
        if c1 != 0:
            continue
        step10 = WORK / "runs" / name / "checkpoints" / "step-00000010.pt"
        c2, o2, _ = run(f"{name}_resumed", train_cmd(*args, f"checkpoint.resume={step10}"), 150, "smoke.log")
        if c2 != 0:
            continue
        whole, resumed = last_result(o1), last_result(o2)
        results["steps"][name] = {"whole": whole, "resumed": resumed, "fp16": amp_summary(o1)}
        if "resumed at step 10" not in o2 or None in (whole, resumed):
            fail(name, "the second run did not resume from step 10 and finish; see smoke.log")
            continue
        same = whole == resumed
        judge(
            name,
            f"4 epochs: test acc {whole[0]}, loss {whole[1]}; resumed from step 10: "
            f"{'the same' if same else f'acc {resumed[0]}, loss {resumed[1]}: NOT the same'}"
            + (f"; {amp_summary(o1)}" if amp_summary(o1) else ""),
            whole[0] if same else None,
            ">=",
            BOUNDS["smoke"],
        )


def recipe(name: str, config: str, budget_s: float, *args: str) -> float | None:
    """A recipe trained to the end: its final-epoch accuracy; its wall time, time split, how the step ran, the
    ready line and each epoch's images/s in the results."""
    extra = ["train.epochs=4"] if DRY else []
    cmd = train_cmd("--config", config, fresh(name), "checkpoint.resume=never", *extra, *args)
    code, out, secs = run(name, cmd, budget_s, f"{name.split('_')[0]}.log")  # fast_bf16 -> fast.log
    if code != 0:
        return None
    acc, split, amp = last_acc(out), time_split(out), amp_summary(out)
    first, ready = re.search(r" step=(.*?) run_dir=", out), re.search(r"ready in .*", out)
    results["steps"][name].update(
        test_acc=acc,
        wall_s=round(secs, 1),
        time_split=split,
        epochs=len(epoch_lines(out)),
        amp=amp,
        step=first and first.group(1),
        ready=ready and ready.group(0),
        epoch_images_s=[int(x) for x in re.findall(r"\| (\d+) img/s", out)],
    )
    say(
        f"{name}: {len(epoch_lines(out))} epochs, wall {secs:.1f} s (process start and data included); training "
        f"{split['train_s']} s, evaluation {split['eval_s']} s, checkpoints {split['save_s']} s"
        + (f"; {amp}" if amp else "")
    )
    return acc


def fast() -> None:
    """configs/fast.yaml to the end three times, same seed: bf16 as users run it (captured on one GPU), fp16
    (eager: its loss scaler decides on the host), and bf16 eager (train.cuda_graphs=off). Each must reach the
    recipe's target; fp16 must end within BOUNDS["fp16_gap"] of bf16, the captured run within
    BOUNDS["captured_gap"] of the eager one; the captured run within its time targets."""
    runs = {
        "bf16": ["train.precision=bf16"],
        "fp16": ["train.precision=fp16"],
        "bf16_eager": ["train.precision=bf16", "train.cuda_graphs=off"],
    }
    accs = {}
    for kind, args in runs.items():
        acc = accs[kind] = recipe(f"fast_{kind}", "configs/fast.yaml", 180, *args)
        what = f"configs/fast.yaml {kind.replace('_', ' ')}: final-epoch test acc {acc}"
        judge(f"fast_{kind}_acc", what, acc, ">=", BOUNDS["fast"])
    for name, a, b, what in (
        ("fp16_vs_bf16", "fp16", "bf16", "|fp16 - bf16|"),
        ("captured_vs_eager", "bf16", "bf16_eager", "|captured - eager| (bf16)"),
    ):
        gap = abs(accs[a] - accs[b]) if None not in (accs[a], accs[b]) else None
        bound = BOUNDS["fp16_gap" if a == "fp16" else "captured_gap"]
        judge(name, f"{what} on configs/fast.yaml, same seed: {gap}", gap, "<=", bound)
    r = results["steps"].get("fast_bf16", {})
    split, wall = r.get("time_split"), r.get("wall_s")
    spent = round(split["train_s"] + split["eval_s"], 1) if split else None
    how = f"step {r.get('step')}; {r.get('ready')}; epochs at {r.get('epoch_images_s')} img/s"
    judge(
        "fast_time",
        f"configs/fast.yaml bf16: training + evaluation {spent} s ({how})",
        spent,
        "<=",
        BOUNDS["fast_train_eval_s"],
    )
    judge(
        "fast_wall",
        f"configs/fast.yaml bf16: wall {wall} s, process start to exit",
        wall,
        "<=",
        BOUNDS["fast_wall_s"],
    )


def two_ranks_one_gpu() -> None:
    """Two ranks on one GPU (gloo: NCCL refuses two ranks on one device): DDP's gradient hooks, the exact
    evaluation's reductions, the preemption agreement's collective and a 2-rank checkpoint and resume, all
    with CUDA tensors. The logged test accuracy and sample count must be `evaluate`'s on the checkpoint."""
    name = "two_ranks"
    torchrun = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d"]
    torchrun.append("--rdzv-endpoint=localhost:0")
    args = [*SMOKE, "dist.backend=gloo", "train.precision=bf16", "run.deterministic=false", fresh(name)]
    step10 = WORK / "runs" / name / "checkpoints" / "step-00000010.pt"
    # two ranks' checkpoints, and a resume of the step-10 one to the end
    for part, resume in (("whole", "never"), ("resumed", step10)):
        cmd = train_cmd(*args, f"checkpoint.resume={resume}", launcher=torchrun)
        code, _, _ = run(f"{name}_{part}", cmd, 150, "two_ranks.log")
        if code != 0:
            return
    records = [
        json.loads(x) for x in (WORK / "runs" / name / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    logged = [r for r in records if r["kind"] == "epoch"][-1]
    ckpt = WORK / "runs" / name / "checkpoints" / "last.pt"
    evaluate = [
        PY,
        "-m",
        "resnet_dist.evaluate",
        "--checkpoint",
        str(ckpt),
        f"data.root={WORK / 'data'}",
        *DATA,
    ]
    code, out, _ = run(f"{name}_evaluate", evaluate, 90, "two_ranks.log")
    if code != 0:
        return
    ev = json.loads(out.strip().splitlines()[-1])
    images = abs(
        round(logged["test/acc"] * logged["test/samples"]) - round(ev["test/acc"] * ev["test/samples"])
    )
    if logged["test/samples"] != ev["test/samples"]:
        fail(name, f"logged {logged['test/samples']} test images, evaluate counted {ev['test/samples']}")
        return
    judge(
        name,
        f"2 gloo ranks on one {'CPU' if DRY else 'GPU'}: logged test acc {logged['test/acc']:.4f}, evaluate "
        f"{ev['test/acc']:.4f} on {ev['test/samples']} images, {images} image(s) apart",
        images,
        "<=",
        BOUNDS["two_ranks_images"],
    )


def seed224() -> None:
    """The original recipe (224x224, 7x7 stem, plain SGD, 10 epochs) trained to the end, in bf16 here (the
    recipe says fp32; bf16 keeps it within a minute on one H200), against the notebook's ~0.89."""
    args = ["train.precision=bf16"] + (["data.resize=56"] if DRY else [])
    acc = recipe("seed224", "configs/seed.yaml", 150, *args)
    judge(
        "seed224_acc",
        f"configs/seed.yaml (bf16) to the end: final-epoch test acc {acc}",
        acc,
        ">=",
        BOUNDS["seed224"],
    )


def bench(name: str, config: str, *args: str, steps=BENCH_STEPS, budget_s: float = 120) -> None:
    """One `python -m resnet_dist.bench` run (bf16 unless the dry run forces fp32), its line in the summary."""
    out_json = WORK / f"{name}.json"
    cmd = [PY, "-m", "resnet_dist.bench", "--config", config, *steps, "--out", str(out_json)]
    code, _, _ = run(name, [*cmd, *common("train.precision=bf16", *args)], budget_s, "bench.log")
    if code == 0:
        report_bench(name, json.loads(out_json.read_text()))


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
    judge(
        name,
        f"{r['images_per_s']:.0f} img/s, step {s['total']:.2f} ms (data {s['data']:.2f}), first step "
        f"{r['first_step_s']:.2f} s, {r['achieved_tflops_per_rank']:.1f} TFLOP/s, {mfu}, {vs}",
        r["images_per_s"],
        ">=",
        BOUNDS.get(name, 1),
    )


def throughput() -> None:
    """The trainer (configs/default.yaml, bf16, EMA) at per-GPU batches 64, 128, 256 and 512 (what 8, 4, 2 and 1
    GPUs get of a global batch of 512), eager and captured, in one process, with the GPU's busy share from the
    profiler; then the trainer without EMA and the bare loop at 512. Judged: captured never slower than eager;
    at 512 images/s, busy and MFU, at 128 busy, against the targets. Then the forecast of 2, 4 and 8 GPUs."""
    out_json = WORK / "sweep.json"
    cmd = [PY, "-m", "resnet_dist.bench", "--config", "configs/default.yaml", *BENCH_STEPS]
    cmd += ["--batches", "64,128,256" if DRY else "64,128,256,512", "--out", str(out_json)]
    code, _, _ = run("sweep", [*cmd, *common("train.precision=bf16")], 240, "bench.log")
    if code == 0:
        runs = json.loads(out_json.read_text())["sweep"]
        results["steps"]["sweep"]["runs"] = runs
        judge_sweep(runs)
        results["forecast"] = forecast(runs)
        say(f"forecast (a model, not a measurement): {results['forecast']['summary']}")
    bench("bench_trainer_no_ema", "configs/default.yaml", "train.ema_decay=0")
    bench("bench_bare", "configs/default.yaml", "--mode", "bare")


def busy(r: dict) -> str:
    return f"{100 * r['gpu_busy']:.0f}%" if r["gpu_busy"] else "n/a"


def judge_sweep(runs: list[dict]) -> None:
    for eager, other in zip(
        runs[::2], runs[1::2]
    ):  # per batch: eager, then as configured (captured on a GPU)
        batch = eager["global_batch"] // eager["world_size"]
        captured = other if other["step"].startswith("captured") else None
        speedup = other["images_per_s"] / eager["images_per_s"]
        judge(
            f"sweep_{batch}",
            f"per-GPU batch {batch}: {other['step'].split(' (')[0]} {other['images_per_s']:.0f} img/s (GPU busy "
            f"{busy(other)}, step {other['step_ms']['total']:.2f} ms), eager {eager['images_per_s']:.0f} img/s "
            f"(GPU busy {busy(eager)}): {speedup:.2f}x",
            speedup,
            ">=",
            BOUNDS["captured_vs_eager_speed"],
        )
        if DRY:
            continue
        c = captured or {"images_per_s": None, "gpu_busy": None, "mfu": None}
        if batch == 512:
            judge(
                "captured_512",
                f"trainer at 512, bf16, EMA, captured: {c['images_per_s']} img/s",
                c["images_per_s"],
                ">=",
                BOUNDS["captured_512_images_s"],
            )
            judge(
                "busy_512",
                f"GPU busy at 512, captured: {c['gpu_busy']}",
                c["gpu_busy"],
                ">=",
                BOUNDS["busy_512"],
            )
            judge(
                "mfu_512",
                f"MFU at 512, captured (datasheet peak): {c['mfu']}",
                c["mfu"],
                ">=",
                BOUNDS["mfu_512"],
            )
        if batch == 128:
            judge(
                "busy_128",
                f"GPU busy at 128, captured: {c['gpu_busy']}",
                c["gpu_busy"],
                ">=",
                BOUNDS["busy_128"],
            )


# The forecast's links: NCCL all-reduce bus bandwidth on 8 H100/H200 over NVLink (370-475 GB/s measured by
# others: the performance notes), and PCIe Gen5 x16 without NVLink (64 GB/s each way on paper, NCCL's ring
# reaching well under half of it: 25 GB/s assumed).
LINKS_GB_S = {"NVLink": 400.0, "PCIe Gen5": 25.0}


def forecast(runs: list[dict]) -> dict:
    """2, 4 and 8 GPUs at a global batch of 512, each GPU taking the one-GPU step measured at 512 / N images
    (captured where it was), plus a ring all-reduce of the fp32 gradients: 2 (N - 1) / N times their bytes over
    the link's bus bandwidth. Two bounds: the all-reduce hidden behind backward (DDP overlaps its buckets with
    it: step = max(compute, all-reduce)) and not hidden at all (step = compute + all-reduce). A forecast, not a
    measurement: 2+ GPUs have not run."""
    from resnet_dist.config import ModelConfig
    from resnet_dist.model import build_model

    grad_bytes = 4 * sum(p.numel() for p in build_model(ModelConfig(stem="cifar")).parameters())
    by = {r["global_batch"] // r["world_size"]: r for r in runs[1::2]}  # as configured: captured on a GPU
    table, parts = {}, []
    for n in (2, 4, 8):
        if 512 // n not in by:
            continue
        step_s = by[512 // n]["step_ms"]["total"] / 1e3
        for link, gb_s in LINKS_GB_S.items():
            comm_s = 2 * (n - 1) / n * grad_bytes / (gb_s * 1e9)
            hidden, exposed = 512 / max(step_s, comm_s), 512 / (step_s + comm_s)
            table[f"{n}x {link}"] = {
                "step_ms": 1e3 * step_s,
                "allreduce_ms": 1e3 * comm_s,
                "images_per_s_not_hidden": exposed,
                "images_per_s_hidden": hidden,
            }
            parts.append(f"{n} GPUs {link} {exposed:,.0f}-{hidden:,.0f} img/s")
    one = f"1 GPU measured {by[512]['images_per_s']:,.0f} img/s; " if 512 in by else ""
    return {
        "model": " ".join(forecast.__doc__.split()),
        "gradient_bytes": grad_bytes,
        "links_gb_s": LINKS_GB_S,
        "table": table,
        "summary": one + "; ".join(parts),
    }


def default() -> None:
    """configs/default.yaml (40 epochs) when it fits in the time left (GPU_CHECK_DEFAULT=1: always)."""
    fast_s = results["steps"].get("fast_bf16", {}).get("wall_s")
    if DRY:
        say("default: skipped in the dry run (the same step as fast, with another config)")
    elif os.environ.get("GPU_CHECK_DEFAULT") == "1" or (fast_s and left() > fast_s * 40 / 12 * 1.2 + 30):
        acc = recipe("default", "configs/default.yaml", left() - 30)
        judge(
            "default_acc", f"configs/default.yaml: final-epoch test acc {acc}", acc, ">=", BOUNDS["default"]
        )
    else:
        say("default: SKIPPED (does not fit in the time left; GPU_CHECK_DEFAULT=1 runs it)")


def original_pipeline() -> None:
    """The original recipe's 224x224 input: torchvision's per-sample DataLoader against our on-device batches."""
    size = ["data.resize=56"] if DRY else []
    steps = ["--steps", "2", "--warmup", "1"] if DRY else ["--steps", "30", "--warmup", "5"]
    workers = ["--workers", "2" if DRY else "8"]
    bench("seed224_ours", "configs/seed.yaml", "--mode", "trainer", *workers, *size, steps=steps)
    bench("seed224_torchvision", "configs/seed.yaml", "--mode", "torchvision", *workers, *size, steps=steps)


UNTESTABLE = (
    "what one GPU cannot test: NCCL between GPUs and nodes (bandwidth, DDP's all-reduce overlap, the bf16 "
    "compression hook), SyncBatchNorm across GPUs, the preemption agreement on NCCL, multi-node rendezvous; "
    "these need 2+ GPUs (launch/torchrun.sh, slurm/train.sh)"
)
STEPS = (
    versions,
    selftest,
    smoke,
    fast,
    two_ranks_one_gpu,
    seed224,
    throughput,
    default,
    original_pipeline,
)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.txt").write_text("")
    WORK.mkdir(parents=True, exist_ok=True)
    for step in STEPS:
        if not ONLY or step.__name__ in ONLY or step is versions:
            step()
    say(UNTESTABLE)
    results["untestable_on_one_gpu"] = UNTESTABLE
    results["seconds"] = round(time.monotonic() - START, 1)
    failed = [k for k, v in results["checks"].items() if not v["pass"]]
    say(
        f"gpu_check: {len(results['checks']) - len(failed)} of {len(results['checks'])} figures PASS"
        + (f"; FAIL: {', '.join(failed)}" if failed else "")
        + f"; done in {results['seconds']} s"
    )
    save_results()
    return 1 if failed else 0


DATA = [f"data.mirror={os.environ['DATA']}"] if os.environ.get("DATA") else []

if __name__ == "__main__":
    sys.exit(main())
