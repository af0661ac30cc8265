"""`python -m resnet_dist.train [--config FILE] [KEY=VALUE ...]`, under any launcher or none."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from . import checkpoint, cli, config, distributed, wandb_logger
from .data import DataError, load_splits
from .metrics import ConsoleLogger, JsonlLogger, MultiLogger, NullLogger, truncate_jsonl
from .optim import configure_backends
from .trainer import Outcome, Trainer

TORCHRUN_MARK = ".torchrun_id"  # in a run directory: the id of the torchrun job that made it


def run_name(cfg: config.Config, env=os.environ) -> str:
    """`run.name`, else the SLURM job id (a requeued job keeps it), else a timestamp. A worker group that
    torchrun restarted (--max-restarts) finds the directory its first attempt made, by torchrun's run id."""
    if cfg.run.name:
        return cfg.run.name
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"]
    torchrun_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if torchrun_id != "none" and int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        marks = sorted(
            Path(cfg.run.dir).glob(f"*/{TORCHRUN_MARK}"), key=lambda p: p.stat().st_mtime, reverse=True
        )
        for mark in marks:
            if mark.read_text().strip() == torchrun_id:
                return mark.parent.name
    # a random suffix: two runs started in the same second never share (and resume) a directory
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def requeue_slurm_job(env=os.environ) -> None:
    """Rank 0 puts its own job back in the queue; it resumes from the run directory named after the job."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"warning: could not requeue SLURM job {job}: {e}", file=sys.stderr, flush=True)
        return
    if proc.returncode == 0:
        print(f"requeued SLURM job {job}: it resumes from its checkpoint when it starts again", flush=True)
    else:
        print(
            f"warning: could not requeue SLURM job {job} (was it submitted with --requeue?): "
            f"{(proc.stderr or proc.stdout).strip()}",
            file=sys.stderr,
            flush=True,
        )


def small_batch_warning(device, per_rank: int, world_size: int) -> str | None:
    """A GPU with fewer than 128 images per step spends its time launching kernels (at 28x28)."""
    if device.type != "cuda" or per_rank >= 128:
        return None
    return (
        f"{per_rank} images per rank per step (train.batch_size={per_rank * world_size} over {world_size} GPUs): "
        "at 28x28 a GPU is launch-bound below 128; raise train.batch_size to 128 x GPUs or more and scale "
        "train.lr with it (README: Per-rank batch)"
    )


def write_plots(run_dir: Path, history: list) -> None:
    """curves.png and confusion.png in the run directory, for runs watched without W&B; never fatal."""
    try:
        from .plots import write_run_plots  # matplotlib: imported by rank 0 only, at the end

        write_run_plots(run_dir, history)
    except Exception as e:  # noqa: BLE001
        print(
            f"warning: could not write the PNG plots ({type(e).__name__}: {e})", file=sys.stderr, flush=True
        )


def resume_state(cfg: config.Config, ckpt_dir: Path, env: distributed.DistEnv):
    """The checkpoint to resume from per `checkpoint.resume`, or None for a fresh start.

    With `auto`, rank 0 picks the newest valid file (reporting any it skips) and every rank loads that
    one: ranks never resume from different checkpoints, whatever their view of a shared filesystem.
    """
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume != "auto":
        return checkpoint.load(Path(cfg.checkpoint.resume))
    found = checkpoint.load_newest(ckpt_dir) if env.is_main else None
    path = distributed.broadcast_object(str(found[1]) if found else None)
    if path is None:
        return None
    return found[0] if env.is_main else checkpoint.load(Path(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_dist.train", description=__doc__)
    p.add_argument("--config", help="YAML file over the built-in defaults")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    args = cli.parse(p, sys.argv[1:] if argv is None else argv)
    try:  # the launcher's world size, read from the environment before any process group exists
        cfg = config.load(args.config, args.overrides, world_size=distributed.detect()["world_size"])
    except config.ConfigError as e:
        cli.usage_error(str(e))
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        return 0

    try:
        env = distributed.setup(cfg.dist.timeout_s)
    except distributed.LaunchError as e:  # a launch mistake: one line, exit 2, before anything is created
        cli.usage_error(str(e))
    if env.is_main:
        for warning in env.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    logger = NullLogger()
    try:
        run_dir = Path(cfg.run.dir) / distributed.broadcast_object(run_name(cfg))
        if env.is_main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config.to_yaml(cfg))
            if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
                (run_dir / TORCHRUN_MARK).write_text(os.environ["TORCHELASTIC_RUN_ID"])
        state = resume_state(cfg, run_dir / "checkpoints", env)
        wb = None
        if env.is_main:
            if state is not None:
                truncate_jsonl(run_dir / "metrics.jsonl", state["progress"]["global_step"])
            # W&B continues the checkpoint's run (same id, its steps go on); None when W&B is off
            wb = wandb_logger.start(cfg, run_dir, run_dir.name, state.get("wandb_id") if state else None)
            logger = MultiLogger(
                ConsoleLogger(), JsonlLogger(run_dir / "metrics.jsonl"), *([wb] if wb else [])
            )
        configure_backends(env.device)
        data = load_splits(cfg.data, env.device)
        # every checkpoint carries the W&B run id: a resumed or requeued job continues the same W&B run
        trainer = Trainer(
            cfg,
            env,
            data,
            run_dir,
            logger,
            preemption=distributed.Preemption(env).install(),
            meta={"wandb_id": wb.id if wb else None},
        )
        if state is not None:
            trainer.load_state_dict(state)
        if env.is_main:
            print(
                f"resnet_dist: launcher={env.launcher} world_size={env.world_size} nodes={env.num_nodes} "
                f"backend={env.backend or 'none'} device={env.device} precision={trainer.precision} "
                f"run_dir={run_dir} "
                + (f"resumed at step {trainer.global_step}" if state else "fresh start"),
                flush=True,
            )
            small = small_batch_warning(env.device, cfg.train.batch_size // env.world_size, env.world_size)
            if small:
                print(f"warning: {small}", file=sys.stderr, flush=True)
        outcome = trainer.fit()
        if env.is_main:
            write_plots(run_dir, trainer.history)
            s = trainer.time_split()
            print(
                f"time: training {s['train']:.1f} s, evaluation {s['eval']:.1f} s, checkpoints {s['save']:.1f} s",
                flush=True,
            )
            if outcome is Outcome.DONE:
                print(f"finished: {run_dir}", flush=True)
            elif cfg.checkpoint.requeue:
                requeue_slurm_job()
        return 0
    except (checkpoint.CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # noqa: BLE001
        hint = distributed.explain_failure(e, cfg.dist.timeout_s)
        if hint is None:
            raise
        print(f"error (rank {env.rank}): {hint}", file=sys.stderr, flush=True)
        return 1
    finally:
        logger.close()
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
