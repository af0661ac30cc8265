"""The run directory: its name, a write probe before anything is written, and the lock that keeps a second
run out of it."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path

TORCHRUN_MARK = ".torchrun_id"  # in a run directory: the id of the torchrun job that made it
LOCK_FILE = ".lock"


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


def check_writable(run_dir: Path) -> None:
    """Before anything is written: every existing part of run_dir/checkpoints is a folder, and the deepest
    one that exists takes a file (a probe, removed at once). Creates nothing."""
    target = run_dir / "checkpoints"
    for part in [target, *target.parents]:
        if part.exists() and not part.is_dir():
            raise RunDirError(f"{part} is a file, not a folder: choose another run.dir or run.name")
        if part.is_dir():
            try:
                with tempfile.TemporaryFile(dir=part):
                    pass
            except OSError as e:
                raise RunDirError(
                    f"cannot write in {part} ({e.strerror}): choose a writable run.dir"
                ) from None
            return


class RunLock:
    """An exclusive lock on <run dir>/.lock, held by rank 0 for the run's lifetime (flock: the kernel drops it
    when the process ends, however it ends, so a dead holder never locks anyone out: torchrun restarts and
    SLURM requeues of the same run get in). The file says who holds it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"run directory {self.path.parent} is in use by {holder}: wait for that run to end, or give "
                "this one another run.name"
            ) from None
        except OSError as e:  # a filesystem without locks: run unguarded rather than not at all
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: cannot lock {self.path} ({e.strerror}): two runs in it would not be stopped")
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%F %T')}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None
