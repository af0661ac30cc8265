"""lock.py: the one lock (data preparation, run directories) on real files and real processes: a live holder
refuses or is waited for with its name said, a dead one (SIGKILL, a reused pid, a stale heartbeat on another
host) blocks nobody, something else at the lock's path is never taken for a lock."""

import os
import signal
import subprocess
import threading
import time

import pytest

from resnet_dist import lock, rundir
from resnet_dist.lock import HOST, Busy, Lock, NotALock

from .helpers import PY, REPO, clean_env

HOLDER = """
import sys
from resnet_dist.lock import Lock
held = Lock(sys.argv[1]).acquire(wait=False)
print("held", flush=True)
sys.stdin.readline()  # until the test says so (or kills it)
held.release()
"""


def hold(path) -> subprocess.Popen:
    """Another process holding the lock at `path` until a line on its stdin (release) or a kill."""
    proc = subprocess.Popen(
        [PY, "-c", HOLDER, str(path)],
        cwd=REPO,
        env=clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(holder: subprocess.Popen) -> None:
    holder.stdin.write("release\n")
    holder.stdin.flush()


def write_lock(path, host: str, pid: int, start: str | None = "1", age_s: float = 0) -> str:
    text = f"{host} pid {pid} since 2025-01-01 00:00:00" + (f" start {start}" if start else "") + "\n"
    path.write_text(text)
    os.utime(path, (time.time() - age_s,) * 2)
    return text


@pytest.mark.processes
def test_a_live_holder_is_refused_at_once_or_waited_for_saying_who_and_since_when(tmp_path):
    """The holder releases only once the waiter has said who it waits for three times (no race with a clock)."""
    path = tmp_path / "lk"
    holder = hold(path)
    try:
        t0 = time.monotonic()
        with pytest.raises(Busy) as e:
            Lock(path).acquire(wait=False)
        assert time.monotonic() - t0 < 1
        assert str(e.value.holder).startswith(f"{HOST} pid {holder.pid} since ")
        said = []

        def say(line: str) -> None:
            said.append(line)
            if len(said) == 3:  # said at once, and twice more while waiting: now the holder lets go
                release(holder)

        waiter = Lock(path, say=say).acquire(wait=True, say_every_s=0.5)
        assert holder.wait(5) == 0  # it released: the waiter got the lock only then
        assert said[0].startswith(f"waiting for {path}: held by {HOST} pid {holder.pid} since ")
        assert len(said) >= 3 and len(set(said)) == 1  # said at once, and again while waiting
        assert path.read_text().startswith(f"{HOST} pid {os.getpid()} since ")
        waiter.release()
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.processes
def test_a_sigkilled_or_reused_holder_on_this_host_is_broken_at_once(tmp_path):
    path = tmp_path / "lk"
    holder = hold(path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    said = []
    t0 = time.monotonic()
    with Lock(path, say=said.append).acquire(wait=False):
        assert time.monotonic() - t0 < 1
    assert len(said) == 1 and said[0].startswith(
        f"note: removed the lock {path} of {HOST} pid {holder.pid} since "
    )
    assert said[0].endswith(": its process is gone")
    # a live pid that belongs to another process than the one that wrote the lock (a restarted container)
    write_lock(path, HOST, os.getpid(), start="1")
    said.clear()
    with Lock(path, say=said.append).acquire(wait=False):
        pass
    assert said[0].endswith("its pid now belongs to another process") and not path.exists()


def test_a_holder_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    path = tmp_path / "lk"
    said = []
    write_lock(path, "elsewhere", 1, age_s=3600)  # its node died an hour ago: broken at once
    t0 = time.monotonic()
    Lock(path, say=said.append).acquire(wait=False).release()
    assert time.monotonic() - t0 < 1 and said[-1].endswith("its heartbeat is 3600 s old")

    # a heartbeat that does not move, from a node whose clock runs ahead: broken after stale_s of watching
    write_lock(path, "elsewhere", 1, start=None, age_s=-30)
    said.clear()
    t0 = time.monotonic()
    Lock(path, stale_s=1.0, say=said.append).acquire(wait=False, poll_s=0.05).release()
    assert 1.0 <= time.monotonic() - t0 < 3
    assert said[0] == (
        f"watching {path}: held by elsewhere pid 1 since 2025-01-01 00:00:00; taken over if its heartbeat "
        "stands still for 1 s"
    )
    assert said[-1].endswith("its heartbeat stood still for 1 s")

    write_lock(path, "elsewhere", 1)  # fresh and beating: refused once it has moved
    stop = threading.Event()

    def beat():
        while not stop.wait(0.2):
            os.utime(path)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        with pytest.raises(Busy, match="elsewhere pid 1"):
            Lock(path, stale_s=2.0, say=said.append).acquire(wait=False, poll_s=0.05)
        said.clear()
        with pytest.raises(Busy, match="waited 1 s"):
            Lock(path, stale_s=0.5, say=said.append).acquire(wait=True, timeout_s=1, poll_s=0.05)
        assert said[0].startswith(f"waiting for {path}: held by elsewhere pid 1")
    finally:
        stop.set()
        beater.join()
    assert path.exists()  # a live holder's lock is never removed


def test_the_heartbeat_moves_while_held_and_release_removes_only_our_lock(tmp_path):
    path = tmp_path / "lk"
    held = Lock(path, beat_s=0.05).acquire(wait=False)
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert path.stat().st_mtime > time.time() - 5
    held.release()
    assert not path.exists()
    held = Lock(path).acquire(wait=False)
    other = write_lock(path, "elsewhere", 1)  # ours was broken and taken meanwhile
    held.release()
    assert path.read_text() == other


def test_something_else_at_the_path_is_not_a_lock_and_is_left_alone(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    with pytest.raises(NotALock, match="is a folder, not a lock file"):
        Lock(folder).acquire(wait=True)
    notes = tmp_path / "notes"
    notes.write_text("my notes\n")
    with pytest.raises(NotALock, match="not a lock file of resnet_dist"):
        Lock(notes).acquire(wait=False)
    assert folder.is_dir() and notes.read_text() == "my notes\n"


def test_a_run_directory_held_by_a_dead_node_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_lock(run_dir / rundir.LOCK_FILE, "node7", 4242, age_s=lock.STALE_S + 5)
    held = rundir.RunLock(run_dir).acquire()
    assert "of node7 pid 4242" in capsys.readouterr().out
    held.release()
    assert sorted(run_dir.iterdir()) == []  # the lock is gone; the folder was not ours to remove
