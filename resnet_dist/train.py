"""`python -m resnet_dist.train [--config FILE] [KEY=VALUE ...]`, under any launcher or none."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from . import (
    cli,
    config,
    configfile,
    distributed,
    launchcheck,
    launchenv,
    perf,
    resume,
    rundir,
    step,
    tensorboard_logger,
    wandb_logger,
)
from .amp import resolve_precision
from .data import load_splits
from .device import CUBLAS_DETERMINISTIC
from .errors import RunError, UsageError
from .loggers import ConsoleLogger, JsonlLogger, MultiLogger, NullLogger
from .preemption import Preemption
from .profiling import NoProfiler, StepProfiler
from .trainer import Outcome, Trainer

log = logging.getLogger("resnet_dist.train")  # not __name__: run as __main__ by python -m


def requeue_slurm_job(env=os.environ) -> None:
    """Rank 0 puts its own job back in the queue; it resumes from the run directory named after the job.
    In a job array that is this task alone (ARRAYJOB_TASK), not the whole array."""
    job = rundir.slurm_job_name(env)
    if not job:
        return
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning(f"could not requeue SLURM job {job}: {e}")
        return
    if proc.returncode == 0:
        log.info(f"requeued SLURM job {job}: it resumes from its checkpoint when it starts again")
    else:
        log.warning(
            f"could not requeue SLURM job {job} (was it submitted with --requeue?): "
            f"{(proc.stderr or proc.stdout).strip()}"
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
        log.warning(f"could not write the PNG plots ({type(e).__name__}: {e})")


def log_model_artifact(wb: wandb_logger.WandbLogger, run_dir: Path) -> None:
    """log.wandb.log_model: the last checkpoint's weights and model card exported into <run dir>/export/
    (what `python -m resnet_dist.export --format safetensors` writes) and logged as a W&B model artifact.
    Only when the run finished: a preempted run logs its model when it finishes after the resume. Never
    fatal: the checkpoint is the run's result either way."""
    from . import export  # only then: onnx and safetensors stay out of every run's start

    try:
        card = export.export_weights(run_dir / "checkpoints" / "last.pt", run_dir / "export")
    except Exception as e:  # noqa: BLE001
        wandb_logger.warn(f"no W&B model artifact: the export failed ({wandb_logger.one_line(e)})")
        return
    wb.log_model(run_dir / "export", card["checkpoint"]["global_step"], card)


def check_run(cfg: config.Config, env: distributed.DistEnv) -> None:
    """What the process group tells about the config, before anything is created (UsageError: exit 2)."""
    if cfg.model.sync_bn and env.distributed and env.device.type != "cuda":
        raise config.ConfigError(
            "model.sync_bn=true needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only (this run is on "
            "CPU); set model.sync_bn=false"
        )
    precision = resolve_precision(cfg.train.precision, env.device)  # train.cuda_graphs=on where it cannot be
    step.plan(cfg.train.cuda_graphs, env.device.type == "cuda", precision, env.world_size, env.backend, cfg)
    for warning in env.warnings:
        log.warning(warning)


class Run:
    """One training run's resources, opened in order and closed in reverse (after a partial open too): the
    data, the run directory (its lock, the checkpoint it resumes), the loggers, the profiler, the trainer."""

    def __init__(self):
        self.lock, self.trainer, self.wb = None, None, None
        self.logger, self.profiler = NullLogger(), NoProfiler()

    def open(self, cfg: config.Config, env: distributed.DistEnv) -> None:
        self.cfg, self.env = cfg, env
        clock = time.perf_counter()
        data = load_splits(cfg.data, env.device)  # first: an unusable data.root stops before anything is made
        data_s = time.perf_counter() - clock
        run_dir = self.run_dir = Path(cfg.run.dir).absolute() / distributed.broadcast_object(
            rundir.run_name(cfg)
        )
        self.lock, state = rundir.open_run(cfg, env, run_dir)
        if state is not None:
            resume.reconcile(cfg, state["config"])  # every rank: the same verdicts; rank 0's log says them
        distributed.rank0_first(lambda: rundir.write_run_files(cfg, run_dir, state))
        if env.is_main:
            # W&B continues the checkpoint's run (same id, its steps go on); None when W&B is off
            self.wb = wandb_logger.start(cfg, run_dir, run_dir.name, state.get("wandb_id") if state else None)
            resumed_at = state["progress"]["global_step"] if state else None
            tb = tensorboard_logger.start(run_dir, resumed_at) if cfg.log.tensorboard else None
            more = [lg for lg in (self.wb, tb) if lg is not None]
            self.logger = MultiLogger(ConsoleLogger(), JsonlLogger(run_dir / "metrics.jsonl"), *more)
        if cfg.log.profile:
            self.profiler = StepProfiler(
                cfg.log.profile, run_dir / "profile", env.rank, env.device, env.is_main
            )
        preemption = Preemption(env).install()
        meta = {
            "wandb_id": self.wb.id if self.wb else None
        }  # a resumed or requeued job continues the W&B run
        clock = time.perf_counter()
        trainer = self.trainer = Trainer(
            cfg, env, data, run_dir, self.logger, preemption, meta, self.profiler
        )
        if state is not None:
            trainer.load_state_dict(state)
        model_s = time.perf_counter() - clock
        how = trainer.capture()  # the step as a CUDA graph, checked against the eager one (or why not)
        log.info(
            f"resnet_dist: launcher={env.launcher} world_size={env.world_size} nodes={env.num_nodes} "
            f"backend={env.backend or 'none'} device={env.device} precision={trainer.precision} step={how} "
            + ("deterministic=on " if cfg.run.deterministic else "")
            + ("sync_bn=on " if cfg.model.sync_bn and env.distributed else "")
            + (f"accum_steps={cfg.train.accum_steps} " if cfg.train.accum_steps > 1 else "")
            + f"run_dir={run_dir} "
            + (f"resumed at step {trainer.global_step}" if state else "fresh start")
        )
        log.info(
            f"ready in {perf.since_process_start():.1f} s (data {data_s:.1f} s, model {model_s:.1f} s, "
            f"capture {trainer.capture_s:.1f} s)"
        )
        small = small_batch_warning(env.device, cfg.train.batch_size // env.world_size, env.world_size)
        if small:
            log.warning(small)

    def train(self) -> int:
        outcome, trainer, cfg = self.trainer.fit(), self.trainer, self.cfg
        if not self.env.is_main:
            return 0
        write_plots(self.run_dir, trainer.history)
        s = trainer.time_split()
        log.info(
            f"time: training {s['train']:.1f} s, evaluation {s['eval']:.1f} s, checkpoints {s['save']:.1f} s"
            + trainer.amp.summary(trainer.global_step)
        )
        if outcome is Outcome.DONE:
            log.info(f"finished: {self.run_dir}")
            if self.wb is not None and cfg.log.wandb.log_model:
                log_model_artifact(self.wb, self.run_dir)
        elif cfg.checkpoint.requeue:
            requeue_slurm_job()
        return 0

    def close(self) -> None:
        self.profiler.close()
        self.logger.close()
        if self.lock is not None:
            self.lock.release()


def set_process_environment(cfg: config.Config) -> None:
    """What CUDA and NCCL read when they start, before setup() touches the GPU or makes the process group."""
    if cfg.run.deterministic:  # cuBLAS's fixed workspace: its deterministic mode
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    if cfg.train.cuda_graphs == "on" and launchenv.detect()["world_size"] > 1:
        # a captured step under DDP: NCCL's asynchronous error handling off (PyTorch's CUDA graph notes)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m resnet_dist.train",
        description=__doc__,
        epilog="config keys (give any as KEY=VALUE; the defaults are shown):\n"
        + configfile.to_yaml(config.Config(), docs=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=cli.expand_path, help="YAML file over the built-in defaults")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML, each key's doc beside it",
    )
    args = cli.parse(p, sys.argv[1:] if argv is None else argv)
    env, run, timeout_s = None, Run(), 600
    try:
        # the launcher's world size, read from the environment before any process group exists
        cfg = config.load(args.config, args.overrides, world_size=launchenv.detect()["world_size"])
        if args.print_config:
            print(configfile.to_yaml(cfg, docs=True), end="")
            return 0
        timeout_s = cfg.dist.timeout_s
        set_process_environment(cfg)
        env = launchcheck.start(cfg.dist.timeout_s, cfg.dist.backend, cfg.run.deterministic)
        cli.setup_logging(env.is_main)
        check_run(cfg, env)
        run.open(cfg, env)
        return run.train()
    except (UsageError, RunError) as e:
        return cli.report(e, env)
    except KeyboardInterrupt:  # Ctrl-C before training started (afterwards it stops the run cleanly)
        log.error("interrupted before training started: nothing to save")
        return 130
    except (
        Exception
    ) as e:  # a collective that failed (a peer died or hangs): one line; anything else as it is
        hint = launchcheck.explain_failure(e, timeout_s)
        if hint is None:
            raise
        print(f"error (rank {env.rank if env else '?'}): {hint}", file=sys.stderr, flush=True)
        return 1
    finally:
        run.close()
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
