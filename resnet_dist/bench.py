"""`python -m resnet_dist.bench [--config FILE] [--mode M] [KEY=VALUE ...]`: throughput and where step time goes.

Modes, all on the same model, batch and precision:
  trainer      the real Trainer: on-device batches + augmentation, DDP, metrics (the default)
  bare         a bare forward/backward/step loop on one fixed real batch: the ceiling the trainer is held to
  torchvision  the original input pipeline: torchvision FashionMNIST, per-sample ToTensor (and Resize),
               a DataLoader with worker processes, feeding the bare step
Works under torchrun (per-rank and total images/s, straggler spread) and on CPU. Prints a table and
writes JSON (`--out`). GPU timings use CUDA events; CPU timings use the wall clock.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import cli, config, distributed
from .data import MEAN, STD, load_split, load_splits, normalize, prepare
from .model import build_model, memory_format
from .optim import autocast_for, configure_backends, make_optimizer, resolve_precision
from .perf import Clock, device_name, matmul_ceiling_tflops, peak_tflops, train_flops_per_image
from .trainer import Trainer


def bare_step_fn(cfg, env, precision):
    """A plain model and optimizer: forward, backward, step; nothing else."""
    model = build_model(cfg.model).to(
        env.device, memory_format=memory_format(env.device, cfg.train.channels_last)
    )
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
        x = normalize(x.to(dev), cfg.data.resize).contiguous(
            memory_format=memory_format(dev, cfg.train.channels_last)
        )
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
    """Seconds of the first step, to its end on the device: with train.compile, the compilation."""
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


def run(cfg, env, mode: str, steps: int, warmup: int, workers: int) -> dict:
    per_rank = cfg.train.batch_size // env.world_size
    precision = resolve_precision(cfg.train.precision, env.device)
    # no preemption handler: a benchmark leaves SIGTERM alone
    trainer = Trainer(cfg, env, load_splits(cfg.data, env.device)) if mode == "trainer" else None
    step = trainer.train_step if trainer else bare_step_fn(cfg, env, precision)
    it = batches(cfg, env, mode, per_rank, trainer, workers)
    clock = Clock(env.device)
    first = first_step_seconds(step, it, clock)
    data, compute = measure(step, it, clock, steps, warmup)
    comm_wait = 0.0
    if trainer is not None and env.distributed:
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
        "compile": cfg.train.compile,
        "ema": cfg.train.ema_decay > 0 and mode == "trainer",
        "steps": steps,
        "first_step_s": first,
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


def table(r: dict) -> str:
    s = r["step_ms"]
    rows = [
        ("mode", r["mode"]),
        ("device", f"{r['device']} x {r['world_size']}"),
        (
            "setup",
            f"{r['stem']} stem, {r['image_size']}px, global batch {r['global_batch']}, {r['precision']}"
            + (", compiled" if r["compile"] else ""),
        ),
        ("first step s", f"{r['first_step_s']:.2f}"),
        ("images/s total", f"{r['images_per_s']:.1f}"),
        ("images/s per rank", f"{r['images_per_s_per_rank']:.1f}"),
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
    p.add_argument("--config")
    p.add_argument("--mode", choices=("trainer", "bare", "torchvision"), default="trainer")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator, workers)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for --mode torchvision")
    p.add_argument("--out", default="bench.json", help="JSON file (rank 0 writes it)")
    args = cli.parse(p, sys.argv[1:] if argv is None else argv)
    if args.steps < 1 or args.warmup < 0 or args.workers < 0:
        cli.usage_error("--steps must be >= 1, --warmup and --workers >= 0")
    try:
        cfg = config.load(args.config, args.overrides, world_size=distributed.detect()["world_size"])
    except config.ConfigError as e:
        cli.usage_error(str(e))
    except distributed.LaunchError as e:  # a launcher variable that is no number (detect())
        cli.launch_error(e)
    try:
        env = distributed.setup(cfg.dist.timeout_s, cfg.dist.backend)
    except distributed.LaunchError as e:
        cli.launch_error(e)
    configure_backends(env.device, cfg.run.deterministic)
    try:
        result = run(cfg, env, args.mode, args.steps, args.warmup, args.workers)
        if env.is_main:
            print(table(result), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
