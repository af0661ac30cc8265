"""The run directory: its name, the checks before anything is written (also used for the data folder), the lock
that keeps a second run out of it, and setting an earlier run's files aside."""

from __future__ import annotations

import errno
import itertools
import os
import tempfile
import time
from pathlib import Path

from . import lock
from .checkpoint import STEP_FILE

TORCHRUN_MARK = ".torchrun_id"  # in a run directory: the id of the torchrun job that made it
LOCK_FILE = ".lock"
PREVIOUS = "previous"  # <run dir>/previous/<time>/: an earlier run's files, set aside by a fresh start
# what a run writes into its directory besides the lock (wandb/ holds W&B's own runs, each under its id)
RUN_FILES = ("config.yaml", "metrics.jsonl", TORCHRUN_MARK, "curves.png", "confusion.png")
RUN_FOLDERS = ("checkpoints", "tensorboard", "profile", "export")


class RunDirError(RuntimeError):
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


def folder_problem(target: Path) -> str | None:
    """Why files cannot be written into the folder `target` (made later where missing), or None: every existing
    part of it is a folder, each missing part's name fits the filesystem, and the deepest existing part takes a
    file (a probe, removed at once). Creates nothing."""
    missing = []
    for part in [target, *target.parents]:
        try:
            exists = part.exists()
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:  # a name too long is said below, with the limit
                return f"cannot look at {part} ({e.strerror})"
            exists = False
        if not exists:
            missing.append(part.name)
            continue
        if not part.is_dir():
            return f"{part} is a file, not a folder"
        limit = name_max(part)
        for name in missing:
            if len(os.fsencode(name)) > limit:
                return (
                    f"the folder name '{name[:20]}...' is {len(os.fsencode(name))} bytes long; the filesystem "
                    f"of {part} takes names of at most {limit}"
                )
        try:
            with tempfile.TemporaryFile(dir=part):
                pass
        except OSError as e:
            return f"cannot write in {part} ({e.strerror})"
        return None
    return None


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_writable(run_dir: Path) -> None:
    """Before anything is written: run_dir/checkpoints can be made and written (folder_problem), and nothing
    that is not a file stands where the run writes or reads one (a folder named last.pt, a .lock that is
    a folder), nor a file where it makes a folder. Creates nothing."""
    problem = folder_problem(run_dir / "checkpoints")
    if problem:
        raise RunDirError(f"{problem}: choose another run.dir or run.name")
    ckpts = run_dir / "checkpoints"
    written = [run_dir / name for name in (*RUN_FILES, LOCK_FILE)]
    if ckpts.is_dir():
        written += [p for p in ckpts.iterdir() if p.name == "last.pt" or STEP_FILE.match(p.name)]
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
