"""The run directory: its name, the checks before anything is written (also used for the data folder), the lock
that keeps a second run out of it, and setting an earlier run's files aside."""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

from . import checkpoint, distributed, files, lock
from .config import Config
from .configfile import to_yaml
from .errors import RunError, UsageError
from .loggers import truncate_jsonl

log = logging.getLogger(__name__)

TORCHRUN_MARK = ".torchrun_id"  # in a run directory: the id of the torchrun job that made it
LOCK_FILE = ".lock"
PREVIOUS = "previous"  # <run dir>/previous/<time>/: an earlier run's files, set aside by a fresh start
# what a run writes into its directory besides the lock (wandb/ holds W&B's own runs, each under its id)
RUN_FILES = ("config.yaml", "metrics.jsonl", TORCHRUN_MARK, "curves.png", "confusion.png")
RUN_FOLDERS = ("checkpoints", "tensorboard", "profile", "export")


class RunDirError(UsageError):
    """The run directory cannot be used (a file in the way, not writable, held by another run): exit 2."""


def run_name(cfg, env=os.environ) -> str:
    """`run.name`, else the SLURM job id (ARRAYJOBID_TASKID in an array; a requeued job keeps it), else a
    timestamp. A worker group that torchrun restarted (--max-restarts) finds the directory its first attempt
    made, by torchrun's run id."""
    name = cfg.run.name or slurm_job_name(env)
    if name:
        return name
    torchrun_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if torchrun_id != "none" and int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        marks = Path(cfg.run.dir).glob(f"*/{TORCHRUN_MARK}")
        for mark in sorted(marks, key=lambda p: p.stat().st_mtime, reverse=True):
            if mark.read_text().strip() == torchrun_id:
                return mark.parent.name
    # a random suffix: two runs started in the same second never share (and resume) a directory
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def slurm_job_name(env=os.environ) -> str | None:
    """This job's SLURM id as scontrol takes it: the job id, or ARRAYJOBID_TASKID for a task of a job array
    (each task is a job of its own, with its own directory and its own requeue); None outside SLURM."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def check_writable(run_dir: Path) -> None:
    """Before anything is written: run_dir/checkpoints can be made and written (folder_problem), and nothing
    that is not a file stands where the run writes or reads one (a folder named last.pt, a .lock that is
    a folder), nor a file where it makes a folder. Creates nothing."""
    problem = files.folder_problem(run_dir / "checkpoints")
    if problem:
        raise RunDirError(f"{problem}: choose another run.dir or run.name")
    ckpts = run_dir / "checkpoints"
    written = [run_dir / name for name in (*RUN_FILES, LOCK_FILE)]
    if ckpts.is_dir():
        written += [p for p in ckpts.iterdir() if p.name == "last.pt" or checkpoint.STEP_FILE.match(p.name)]
    for path in written:
        if os.path.lexists(path) and not path.is_file():
            raise RunDirError(
                f"{path} is a folder or a link to nothing, not a file: move it away or choose another run.name"
            )
    for path in (run_dir / name for name in (*RUN_FOLDERS, PREVIOUS)):
        if os.path.lexists(path) and not path.is_dir():
            raise RunDirError(f"{path} is a file, not a folder: move it away or choose another run.name")


def set_aside(run_dir: Path) -> Path | None:
    """A fresh start in a directory an earlier run used: that run's files (RUN_FILES, RUN_FOLDERS) move into
    previous/<time>/, where no resume finds its checkpoints and no rotation deletes the new ones for being
    older. Returns that folder, None when there was nothing to move."""
    paths = [run_dir / name for name in (*RUN_FOLDERS, *RUN_FILES)]
    found = [
        p for p in paths if (any(p.iterdir()) if p.is_dir() else os.path.lexists(p))
    ]  # empty folders stay
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in itertools.count():
        dest = run_dir / PREVIOUS / (f"{stamp}-{i}" if i else stamp)
        try:
            dest.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    for path in found:
        os.rename(path, dest / path.name)
    return dest


class RunLock:
    """Rank 0's hold on its run directory for the run's lifetime: the project's one lock (lock.Lock) on
    <run dir>/.lock. A second run into the directory is refused at once while the holder lives; a dead holder
    (killed, its node gone) blocks nobody, so a torchrun restart or a SLURM requeue gets in. It makes the
    directory when missing, and on release removes again what it made when the run left it empty (a refused
    run leaves nothing behind)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.lock = lock.Lock(run_dir / LOCK_FILE)
        self.made: list[Path] = []  # deepest first

    def acquire(self) -> RunLock:
        for part in [self.run_dir, *self.run_dir.parents]:
            if part.exists():
                break
            self.made.append(part)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire(wait=False)
        except lock.Busy as e:
            self.release()
            raise RunDirError(
                f"run directory {self.run_dir} is in use by {e.holder}: wait for that run to end, or give "
                "this one another run.name"
            ) from None
        except lock.NotALock as e:
            self.release()
            raise RunDirError(str(e)) from None
        except OSError as e:
            self.release()
            raise RunDirError(
                f"cannot lock {self.run_dir} ({e.strerror}): choose a writable run.dir"
            ) from None
        return self

    def release(self) -> None:
        self.lock.release()
        for part in self.made:
            try:
                part.rmdir()  # only an empty folder: never anything the run or a user wrote
            except OSError:
                break
        self.made = []


def open_run(cfg: Config, env: distributed.DistEnv, run_dir: Path):
    """Rank 0 checks that the run directory is writable, locks it and picks the checkpoint to resume from;
    every rank gets the same outcome (or the same error). Returns (lock, state): the lock on rank 0 (None
    elsewhere) and the loaded checkpoint or None for a fresh start. Writes nothing but the lock (and the run
    directory when missing: a refused run's release removes both)."""
    held, loaded = [], []  # rank 0's lock and loaded checkpoint: only the path is broadcast

    def on_rank0():
        check_writable(run_dir)
        held.append(RunLock(run_dir).acquire())
        ckpts = run_dir / "checkpoints"
        if cfg.checkpoint.resume == "never":
            return None
        if cfg.checkpoint.resume != "auto":
            loaded.append(checkpoint.load(Path(cfg.checkpoint.resume)))
            return cfg.checkpoint.resume
        found = checkpoint.load_newest(ckpts)
        if found is None and checkpoint.any_checkpoint(ckpts):
            raise RunDirError(
                f"{ckpts} holds checkpoints but none of them loads: resume from one with "
                "checkpoint.resume=PATH, or start over them with checkpoint.resume=never"
            )
        loaded.extend(found[:1] if found else [])
        return str(found[1]) if found else None

    try:
        path = distributed.rank0_first(on_rank0)
    except BaseException:
        for lock in held:
            lock.release()
        raise
    state = loaded[0] if loaded else (checkpoint.load(Path(path)) if path else None)
    return (held[0] if held else None), state


def continues(cfg: Config, run_dir: Path, state: dict | None) -> bool:
    """Whether this run goes on from the run directory's own checkpoints (not a fresh start, nor a resume
    from another directory's checkpoint)."""
    if state is None:
        return False
    if cfg.checkpoint.resume == "auto":
        return True
    return Path(cfg.checkpoint.resume).resolve().parent == (run_dir / "checkpoints").resolve()


def write_run_files(cfg: Config, run_dir: Path, state: dict | None) -> None:
    """Rank 0, once the run is decided: config.yaml (what actually runs), metrics.jsonl cut back to the
    checkpoint, torchrun's run id. A run that does not continue this directory's checkpoints first sets the
    earlier run's files aside, where no resume finds them and no rotation deletes the new ones."""
    if continues(cfg, run_dir, state):
        truncate_jsonl(run_dir / "metrics.jsonl", state["progress"]["global_step"])
    else:
        aside = set_aside(run_dir)
        if aside is not None:
            log.info(
                f"starting over: the earlier run's files in this directory (checkpoints, metrics.jsonl, ...) are "
                f"now in {aside.relative_to(run_dir)}/, where nothing resumes from them"
            )
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        files.write_text(run_dir / "config.yaml", to_yaml(cfg))
        if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
            files.write_text(run_dir / TORCHRUN_MARK, os.environ["TORCHELASTIC_RUN_ID"])
    except OSError as e:
        raise RunError(f"cannot write the run's files in {run_dir}: {e.strerror or e}") from None
