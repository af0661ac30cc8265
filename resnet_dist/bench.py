"""`python -m resnet_dist.bench [--config FILE] [--mode M] [KEY=VALUE ...]`: throughput and where step time goes.

Modes, all on the same model, batch and precision:
  trainer      the real Trainer: on-device batches + augmentation, DDP, metrics (the default)
  bare         a bare forward/backward/step loop on one fixed real batch: the ceiling the trainer is held to
  torchvision  the original input pipeline: torchvision FashionMNIST, per-sample ToTensor (and Resize),
               a DataLoader with worker processes, feeding the bare step
Works under torchrun (per-rank and total images/s, straggler spread) and on CPU. Prints a table and
writes JSON (`--out`). GPU timings use CUDA events; CPU timings use the wall clock. On GPUs it also reports how
busy the GPU was (kernel time / wall time over a few steps, from the profiler): a launch-bound step shows there.
The trainer's step is captured as a CUDA graph as training would (train.cuda_graphs). `--batches 64,128,...`
measures the trainer at each per-GPU batch, eager and captured, in one process (the GPU check's sweep).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import cli, config, distributed, launchcheck, launchenv
from .amp import autocast_for, resolve_precision
from .data import load_splits, normalize
from .errors import RunError, UsageError
from .fashion_mnist import MEAN, STD, load_split, prepare
from .model import build_model, memory_format
from .optim import make_optimizer
from .perf import Clock, busy_fraction, device_name, matmul_ceiling_tflops, peak_tflops, train_flops_per_image
from .trainer import Trainer


def bare_step_fn(cfg, env, precision):
    """A plain model and optimizer: forward, backward, step; nothing else."""
    model = build_model(cfg.model).to(env.device, memory_format=memory_format(env.device))
    opt = make_optimizer(model, cfg.train, env.device, precision)
    autocast = autocast_for(precision, env.device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        with autocast:
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def batches(cfg, env, mode, per_rank, trainer=None, workers=4):
    """An endless iterator of (x, y) on the device for the chosen pipeline."""
    dev = env.device
    if mode == "trainer":
        return itertools.chain.from_iterable(trainer.batches.epoch(e, trainer.gen) for e in itertools.count())
    if mode == "bare":  # one real batch, normalized (and resized) once, used for every step
        x, y = load_split(prepare(cfg.data.root, cfg.data.mirror), "train", per_rank)
        x = normalize(x.to(dev), cfg.data.resize).contiguous(memory_format=memory_format(dev))
        return itertools.repeat((x, y.to(dev)))
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    prepare(cfg.data.root, cfg.data.mirror)
    tf = [transforms.Resize(cfg.data.resize)] if cfg.data.resize else []
    ds = datasets.FashionMNIST(
        cfg.data.root,
        train=True,
        download=False,
        transform=transforms.Compose(tf + [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
    )
    loader = DataLoader(
        ds,
        batch_size=per_rank,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        pin_memory=dev.type == "cuda",
    )
    return (
        (x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
        for _ in itertools.count()
        for x, y in loader
    )


def first_step_seconds(step, it, clock) -> float:
    """Seconds of the first step, to its end on the device."""
    start = clock.mark()
    step(*next(it))
    return clock.seconds(start, clock.mark())


def measure(step, it, clock, n: int, warmup: int) -> tuple[float, float]:
    """Mean seconds per step spent getting the batch and in the step itself."""
    for _ in range(warmup):
        step(*next(it))
    marks = []
    for _ in range(n):
        a = clock.mark()
        x, y = next(it)
        b = clock.mark()
        step(x, y)
        marks.append((a, b, clock.mark()))
    data = sum(clock.seconds(a, b) for a, b, _ in marks) / n
    compute = sum(clock.seconds(b, c) for _, b, c in marks) / n
    return data, compute


def run(cfg, env, mode: str, steps: int, warmup: int, workers: int, data=None) -> dict:
    per_rank = cfg.train.batch_size // env.world_size
    precision = resolve_precision(cfg.train.precision, env.device)
    # no preemption handler: a benchmark leaves SIGTERM alone
    trainer, how = None, None
    if mode == "trainer":
        trainer = Trainer(cfg, env, data or load_splits(cfg.data, env.device))
        how = trainer.capture()  # as training would: a CUDA graph where train.cuda_graphs allows it
    step = trainer.train_step if trainer else bare_step_fn(cfg, env, precision)
    it = batches(cfg, env, mode, per_rank, trainer, workers)
    clock = Clock(env.device)
    first = first_step_seconds(step, it, clock)
    data, compute = measure(step, it, clock, steps, warmup)
    busy = busy_fraction(step, it, env.device)
    comm_wait = 0.0
    # the all-reduce wait: the same steps under no_sync, eagerly (a replayed graph keeps its all-reduce)
    if trainer is not None and env.distributed and not trainer.step.captured:
        # the same steps without the gradient all-reduce: the difference is the time spent waiting for it
        with trainer.ddp.no_sync():
            _, local = measure(step, it, clock, steps, 1)
        comm_wait = max(0.0, compute - local)
        compute = local
    total = data + compute + comm_wait
    per_rank_times = [total] * env.world_size
    if env.distributed:
        dist.all_gather_object(per_rank_times, total)
    flops = train_flops_per_image(cfg)
    slowest = max(per_rank_times)
    images_per_s = cfg.train.batch_size / slowest  # the global batch advances at the pace of the slowest rank
    achieved = flops * images_per_s / env.world_size / 1e12
    name = device_name(env.device)  # None on CPU: no datasheet peak, no matmul ceiling
    peak = peak_tflops(name, precision, torch.backends.cudnn.allow_tf32)
    ceiling = matmul_ceiling_tflops(env.device) if name else None
    return {
        "mode": mode,
        "device": name or "cpu",
        "world_size": env.world_size,
        "precision": precision,
        "stem": cfg.model.stem,
        "image_size": cfg.data.resize or 28,
        "global_batch": cfg.train.batch_size,
        "ema": cfg.train.ema_decay > 0 and mode == "trainer",
        "step": how if trainer else "eager",
        "capture_s": trainer.capture_s if trainer else 0.0,
        "steps": steps,
        "first_step_s": first,
        "gpu_busy": busy,
        "images_per_s": images_per_s,
        "images_per_s_per_rank": images_per_s / env.world_size,
        "step_ms": {
            "data": 1e3 * data,
            "compute": 1e3 * compute,
            "allreduce_wait": 1e3 * comm_wait,
            "total": 1e3 * total,
        },
        "straggler": {
            "fastest_ms": 1e3 * min(per_rank_times),
            "slowest_ms": 1e3 * slowest,
            "spread_pct": 100 * (slowest - min(per_rank_times)) / slowest,
        },
        "train_gflop_per_image": flops / 1e9,
        "achieved_tflops_per_rank": achieved,
        "peak_tflops_per_rank": peak,
        "mfu": achieved / peak if peak else None,
        "matmul_bf16_tflops": ceiling,
        "mfu_vs_matmul": achieved / ceiling if ceiling else None,
    }


def sweep(cfg, env, per_gpu: list[int], steps: int, warmup: int) -> dict:
    """The trainer at each per-GPU batch, eager (train.cuda_graphs=off) and as configured (captured where it
    can be): what 1, 2, 4, 8 GPUs get of a global batch of 512 is 512, 256, 128, 64 each."""
    data = load_splits(cfg.data, env.device)
    warm = copy.deepcopy(cfg)  # one untimed run first: the process's first steps pay for its thread pools,
    warm.train.batch_size, warm.train.cuda_graphs = per_gpu[0] * env.world_size, "off"  # allocator, libraries
    run(warm, env, "trainer", 1, 1, 0, data)
    runs = []
    for batch in per_gpu:
        for setting in ("off", cfg.train.cuda_graphs):
            c = copy.deepcopy(cfg)
            c.train.batch_size, c.train.cuda_graphs = batch * env.world_size, setting
            runs.append(run(c, env, "trainer", steps, warmup, 0, data))
            if env.device.type == "cuda":
                torch.cuda.empty_cache()  # the graphs' memory pools of this run
    return {"sweep": runs}


def sweep_table(result: dict) -> str:
    lines = [f"{'per-GPU batch':>13}  {'step':<10}  {'images/s':>10}  {'step ms':>8}  {'GPU busy':>8}"]
    for r in result["sweep"]:
        busy = f"{100 * r['gpu_busy']:.0f}%" if r["gpu_busy"] else "n/a"
        kind = "captured" if r["step"].startswith("captured") else "eager"
        lines.append(
            f"{r['global_batch'] // r['world_size']:>13}  {kind:<10}  {r['images_per_s']:>10.0f}  "
            f"{r['step_ms']['total']:>8.2f}  {busy:>8}"
        )
    return "\n".join(lines)


def table(r: dict) -> str:
    s = r["step_ms"]
    rows = [
        ("mode", r["mode"]),
        ("device", f"{r['device']} x {r['world_size']}"),
        (
            "setup",
            f"{r['stem']} stem, {r['image_size']}px, global batch {r['global_batch']}, {r['precision']}",
        ),
        ("step", r["step"]),
        ("capture s", f"{r['capture_s']:.2f}"),
        ("first step s", f"{r['first_step_s']:.2f}"),
        ("images/s total", f"{r['images_per_s']:.1f}"),
        ("images/s per rank", f"{r['images_per_s_per_rank']:.1f}"),
        ("GPU busy", f"{100 * r['gpu_busy']:.0f}% of the wall time" if r["gpu_busy"] else "n/a (CPU)"),
        ("step ms: data", f"{s['data']:.2f}"),
        ("step ms: compute", f"{s['compute']:.2f}"),
        ("step ms: all-reduce wait", f"{s['allreduce_wait']:.2f}"),
        ("step ms: total", f"{s['total']:.2f}"),
        (
            "straggler spread",
            f"{r['straggler']['spread_pct']:.1f}% "
            f"({r['straggler']['fastest_ms']:.1f}-{r['straggler']['slowest_ms']:.1f} ms)",
        ),
        ("train GFLOP/image", f"{r['train_gflop_per_image']:.3f}"),
        ("TFLOP/s per rank", f"{r['achieved_tflops_per_rank']:.3f}"),
        (
            "MFU (datasheet)",
            f"{100 * r['mfu']:.1f}% of {r['peak_tflops_per_rank']} TFLOP/s"
            if r["mfu"]
            else "n/a (peak unknown)",
        ),
        (
            "MFU (measured bf16 matmul)",
            f"{100 * r['mfu_vs_matmul']:.1f}% of {r['matmul_bf16_tflops']:.0f} TFLOP/s"
            if r["mfu_vs_matmul"]
            else "n/a (CPU)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m resnet_dist.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=cli.expand_path)
    p.add_argument("--mode", choices=("trainer", "bare", "torchvision"), default="trainer")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (autotuning, allocator)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for --mode torchvision")
    p.add_argument("--out", default="bench.json", help="JSON file (rank 0 writes it)")
    p.add_argument(
        "--batches",
        help="per-GPU batches to sweep, e.g. 64,128,256,512: the trainer at each, eager and captured",
    )
    args = cli.parse(p, sys.argv[1:] if argv is None else argv)
    env = None
    try:
        if args.steps < 1 or args.warmup < 0 or args.workers < 0:
            raise UsageError("--steps must be >= 1, --warmup and --workers >= 0")
        try:
            batches_arg = [int(b) for b in args.batches.split(",")] if args.batches else []
            assert all(b >= 2 for b in batches_arg)
        except (ValueError, AssertionError):
            raise UsageError(
                f"--batches takes per-GPU batch sizes of 2 or more, comma-separated; got {args.batches!r}"
            ) from None
        cfg = config.load(args.config, args.overrides, world_size=launchenv.detect()["world_size"])
        env = launchcheck.start(cfg.dist.timeout_s, cfg.dist.backend, cfg.run.deterministic)
        cli.setup_logging(env.is_main)
        if batches_arg:
            result = sweep(cfg, env, batches_arg, args.steps, args.warmup)
            text = sweep_table(result)
        else:
            result = run(cfg, env, args.mode, args.steps, args.warmup, args.workers)
            text = table(result)
        if env.is_main:
            print(text, flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    except (UsageError, RunError) as e:
        return cli.report(e, env)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
