"""`python -m resnet_dist.train [--config FILE] [KEY=VALUE ...]`, under any launcher or none."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from . import (
    checkpoint,
    cli,
    config,
    distributed,
    export,
    perf,
    rundir,
    step,
    tensorboard_logger,
    wandb_logger,
)
from .data import DataError, load_splits
from .metrics import (
    ConsoleLogger,
    Diverged,
    JsonlLogger,
    MetricsError,
    MultiLogger,
    NullLogger,
    truncate_jsonl,
)
from .optim import CUBLAS_DETERMINISTIC, configure_backends, resolve_precision
from .profiling import NoProfiler, StepProfiler
from .trainer import Outcome, Trainer


def requeue_slurm_job(env=os.environ) -> None:
    """Rank 0 puts its own job back in the queue; it resumes from the run directory named after the job.
    In a job array that is this task alone (ARRAYJOB_TASK), not the whole array."""
    job = rundir.slurm_job_name(env)
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


def log_model_artifact(wb: wandb_logger.WandbLogger, run_dir: Path) -> None:
    """log.wandb.log_model: the last checkpoint's weights and model card exported into <run dir>/export/
    (what `python -m resnet_dist.export --format safetensors` writes) and logged as a W&B model artifact.
    Only when the run finished: a preempted run logs its model when it finishes after the resume. Never
    fatal: the checkpoint is the run's result either way."""
    try:
        card = export.export_weights(run_dir / "checkpoints" / "last.pt", run_dir / "export")
    except Exception as e:  # noqa: BLE001
        wandb_logger.warn(f"no W&B model artifact: the export failed ({wandb_logger.one_line(e)})")
        return
    wb.log_model(run_dir / "export", card["checkpoint"]["global_step"], card)


class Refused(RuntimeError):
    """A run that must not start (a changed model on resume, no loadable checkpoint over existing ones): exit 2."""


def open_run(cfg: config.Config, env: distributed.DistEnv, run_dir: Path):
    """Rank 0 checks that the run directory is writable, locks it and picks the checkpoint to resume from;
    every rank gets the same outcome (or the same error). Returns (lock, state): the lock on rank 0 (None
    elsewhere) and the loaded checkpoint or None for a fresh start. Writes nothing but the lock (and the run
    directory when missing: a refused run's release removes both)."""
    held, loaded = [], []  # rank 0's lock and loaded checkpoint: only the path is broadcast

    def on_rank0():
        rundir.check_writable(run_dir)
        held.append(rundir.RunLock(run_dir).acquire())
        ckpts = run_dir / "checkpoints"
        if cfg.checkpoint.resume == "never":
            return None
        if cfg.checkpoint.resume != "auto":
            loaded.append(checkpoint.load(Path(cfg.checkpoint.resume)))
            return cfg.checkpoint.resume
        found = checkpoint.load_newest(ckpts)
        if found is None and checkpoint.any_checkpoint(ckpts):
            raise Refused(
                f"{ckpts} holds checkpoints but none of them loads: resume from one with "
                "checkpoint.resume=PATH, or start over them with checkpoint.resume=never"
            )
        loaded.extend(found[:1] if found else [])
        return str(found[1]) if found else None

    try:
        path = distributed.rank0_first(on_rank0, (rundir.RunDirError, checkpoint.CheckpointError, Refused))
    except BaseException:
        for lock in held:
            lock.release()
        raise
    state = loaded[0] if loaded else (checkpoint.load(Path(path)) if path else None)
    return (held[0] if held else None), state


def reconcile(cfg: config.Config, state: dict, env: distributed.DistEnv) -> None:
    """A resume with another config: one line per changed key saying what happens to it; what cannot apply
    coherently (model, input size, batch, training set) stops the run before anything is written."""
    changes = config.resume_changes(state["config"], cfg)
    if env.is_main:
        for key, old, new, verdict in changes:
            print(f"config: {key} {old!r} -> {new!r}: {verdict}", flush=True)
    refused = [key for key, *_, verdict in changes if verdict.startswith("refused")]
    if refused:
        raise Refused(
            f"cannot resume with a changed {', '.join(refused)} (see the config: lines above): "
            "resume with the checkpoint's values, or start a new run (another run.name)"
        )


def continues(cfg: config.Config, run_dir: Path, state: dict | None) -> bool:
    """Whether this run goes on from the run directory's own checkpoints (not a fresh start, nor a resume
    from another directory's checkpoint)."""
    if state is None:
        return False
    if cfg.checkpoint.resume == "auto":
        return True
    return Path(cfg.checkpoint.resume).resolve().parent == (run_dir / "checkpoints").resolve()


def write_run_files(cfg: config.Config, run_dir: Path, state: dict | None) -> None:
    """Rank 0, once the run is decided: config.yaml (what actually runs), metrics.jsonl cut back to the
    checkpoint, torchrun's run id. A run that does not continue this directory's checkpoints first sets the
    earlier run's files aside, where no resume finds them and no rotation deletes the new ones."""
    if continues(cfg, run_dir, state):
        truncate_jsonl(run_dir / "metrics.jsonl", state["progress"]["global_step"])
    else:
        aside = rundir.set_aside(run_dir)
        if aside is not None:
            print(
                f"starting over: the earlier run's files in this directory (checkpoints, metrics.jsonl, ...) are "
                f"now in {aside.relative_to(run_dir)}/, where nothing resumes from them",
                flush=True,
            )
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.to_yaml(cfg))
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        (run_dir / rundir.TORCHRUN_MARK).write_text(os.environ["TORCHELASTIC_RUN_ID"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_dist.train", description=__doc__)
    p.add_argument("--config", help="YAML file over the built-in defaults")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    args = cli.parse(p, sys.argv[1:] if argv is None else argv)
    try:  # the launcher's world size, read from the environment before any process group exists
        cfg = config.load(args.config, args.overrides, world_size=distributed.detect()["world_size"])
    except config.ConfigError as e:
        cli.usage_error(str(e))
    except distributed.LaunchError as e:  # a launcher variable that is no number (detect())
        cli.launch_error(e)
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        return 0

    if cfg.run.deterministic:  # read by cuBLAS when CUDA starts: before setup() touches the GPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    if cfg.train.cuda_graphs == "on" and distributed.detect()["world_size"] > 1:
        # a captured step under DDP: NCCL's asynchronous error handling off before the process group exists
        # (PyTorch's CUDA graph notes, whole-network capture with DistributedDataParallel)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    try:
        env = distributed.setup(cfg.dist.timeout_s, cfg.dist.backend)
    except distributed.LaunchError as e:  # a launch mistake: one line, exit 2, before anything is created
        cli.launch_error(e)
    if cfg.model.sync_bn and env.distributed and env.device.type != "cuda":
        distributed.teardown()
        cli.fail(
            "model.sync_bn=true needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only (this run is on "
            "CPU); set model.sync_bn=false",
            2,
            quiet=not env.is_main,
        )
    try:  # train.cuda_graphs=on where a capture cannot work: a usage error, before anything is created
        precision = resolve_precision(cfg.train.precision, env.device)
        step.plan(
            cfg.train.cuda_graphs, env.device.type == "cuda", precision, env.world_size, env.backend, cfg
        )
    except step.CaptureError as e:
        distributed.teardown()
        cli.fail(str(e), 2, quiet=not env.is_main)
    if env.is_main:
        for warning in env.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    logger, lock, training, profiler = NullLogger(), None, False, NoProfiler()
    try:
        # the data first: an unusable or damaged data.root stops the run before anything is created
        clock = time.perf_counter()
        data = load_splits(cfg.data, env.device)
        data_s = time.perf_counter() - clock
        run_dir = Path(cfg.run.dir).absolute() / distributed.broadcast_object(rundir.run_name(cfg))
        lock, state = open_run(cfg, env, run_dir)
        if state is not None:
            reconcile(cfg, state, env)
        distributed.rank0_first(lambda: write_run_files(cfg, run_dir, state), (MetricsError, OSError))
        wb = None
        if env.is_main:
            # W&B continues the checkpoint's run (same id, its steps go on); None when W&B is off
            wb = wandb_logger.start(cfg, run_dir, run_dir.name, state.get("wandb_id") if state else None)
            resumed_at = state["progress"]["global_step"] if state else None
            tb = tensorboard_logger.start(run_dir, resumed_at) if cfg.log.tensorboard else None
            more = [lg for lg in (wb, tb) if lg is not None]
            logger = MultiLogger(ConsoleLogger(), JsonlLogger(run_dir / "metrics.jsonl"), *more)
        if cfg.log.profile:
            profiler = StepProfiler(cfg.log.profile, run_dir / "profile", env.rank, env.device, env.is_main)
        configure_backends(env.device, cfg.run.deterministic)
        # every checkpoint carries the W&B run id: a resumed or requeued job continues the same W&B run
        preemption = distributed.Preemption(env).install()
        meta = {"wandb_id": wb.id if wb else None}
        clock = time.perf_counter()
        trainer = Trainer(cfg, env, data, run_dir, logger, preemption, meta, profiler)
        if state is not None:
            trainer.load_state_dict(state)
        model_s = time.perf_counter() - clock
        how = trainer.capture()  # the step as a CUDA graph, checked against the eager one (or why not)
        if env.is_main:
            print(
                f"resnet_dist: launcher={env.launcher} world_size={env.world_size} nodes={env.num_nodes} "
                f"backend={env.backend or 'none'} device={env.device} precision={trainer.precision} step={how} "
                + ("deterministic=on " if cfg.run.deterministic else "")
                + ("sync_bn=on " if cfg.model.sync_bn and env.distributed else "")
                + (f"accum_steps={cfg.train.accum_steps} " if cfg.train.accum_steps > 1 else "")
                + f"run_dir={run_dir} "
                + (f"resumed at step {trainer.global_step}" if state else "fresh start"),
                flush=True,
            )
            print(
                f"ready in {perf.since_process_start():.1f} s (data {data_s:.1f} s, model {model_s:.1f} s, "
                f"capture {trainer.capture_s:.1f} s)",
                flush=True,
            )
            small = small_batch_warning(env.device, cfg.train.batch_size // env.world_size, env.world_size)
            if small:
                print(f"warning: {small}", file=sys.stderr, flush=True)
        training = True
        outcome = trainer.fit()
        if env.is_main:
            write_plots(run_dir, trainer.history)
            s = trainer.time_split()
            print(
                f"time: training {s['train']:.1f} s, evaluation {s['eval']:.1f} s, checkpoints {s['save']:.1f} s"
                + trainer.amp.summary(trainer.global_step),
                flush=True,
            )
            if outcome is Outcome.DONE:
                print(f"finished: {run_dir}", flush=True)
                if wb is not None and cfg.log.wandb.log_model:
                    log_model_artifact(wb, run_dir)
            elif cfg.checkpoint.requeue:
                requeue_slurm_job()
        return 0
    except step.CaptureError as e:  # train.cuda_graphs=on, and the capture failed or disagreed: every rank
        if env.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except (rundir.RunDirError, Refused, MetricsError, checkpoint.CheckpointError, Diverged) as e:
        # every rank holds the same error (rank0_first, or a value all ranks computed): rank 0 says it.
        # Found before training: exit 2, as for any usage error; during training (a full disk): 1
        if env.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1 if training else 2
    except DataError as e:  # this rank's view of data.root, found before anything was created
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # this rank's own problem: a file it writes
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started (afterwards it stops the run cleanly)
        print("interrupted before training started: nothing to save", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001
        hint = distributed.explain_failure(e, cfg.dist.timeout_s)
        if hint is None:
            raise
        print(f"error (rank {env.rank}): {hint}", file=sys.stderr, flush=True)
        return 1
    finally:
        profiler.close()
        logger.close()
        if lock is not None:
            lock.release()
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
