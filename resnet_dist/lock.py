"""The one lock of the project (preparing the data, a run directory), on a local disk and across nodes on a
shared filesystem (NFS, where flock is unreliable).

The lock is a file created with O_CREAT | O_EXCL (atomic locally and on NFSv3+) holding one line: who holds
it (host, pid, since when, and when that process started, which tells a reused pid apart). While it is held a
daemon thread touches the file every `beat_s` seconds: its mtime is a heartbeat. A holder that cannot be alive
is broken at once, however it ended (SIGKILL included):
  - on this host: its pid is gone (or a zombie), or belongs to a process started at another time;
  - on another host (or a line without a start time): its heartbeat is older than `stale_s`, or does not move
    while it is watched for `stale_s` (the hosts' clocks are taken to agree within `stale_s`).
Release removes the file.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

log = logging.getLogger(__name__)

HOST = socket.gethostname()
STALE_S = 60.0  # a heartbeat older than this: its holder is gone
BEAT_S = 5.0
SAY_EVERY_S = 30.0  # a waiting process says again who it waits for
LINE = re.compile(r"(\S+) pid (\d+) since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?: start (\d+))?")


class LockError(UsageError):
    pass


class Busy(LockError):
    """A live process holds the lock."""

    def __init__(self, path: Path, holder: Holder, msg: str = ""):
        self.holder = holder
        super().__init__(msg or f"{path} is held by {holder}")


class NotALock(LockError):
    """Something else is at the lock's path (a folder, a file of other content): never removed."""


def started(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, from /proc); "" when it lives but /proc cannot say;
    None when there is no such process, or only a zombie (it will never release anything)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        return None if fields[0] in ("Z", "X") else fields[19]
    except FileNotFoundError:
        if os.path.exists("/proc/self/stat"):
            return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return ""


@dataclass(frozen=True)
class Holder:
    text: str  # the lock file's content, as read
    host: str | None = None
    pid: int = 0
    since: str = ""
    start: str | None = None

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """None for content that is not a lock line of ours; an empty file is a lock being written."""
        if not text.strip():
            return cls(text)
        m = LINE.fullmatch(text.strip())
        return m and cls(text, m[1], int(m[2]), m[3], m[4])

    def __str__(self) -> str:
        if self.host is None:
            return "a process that is still writing its name into it"
        return f"{self.host} pid {self.pid} since {self.since}"

    def dead_here(self) -> str | None:
        """On this host, with a start time: why the holder is not alive (None: it is)."""
        now = started(self.pid) if self.pid > 0 else None
        if now is None:
            return "its process is gone"
        if now and now != self.start:
            return "its pid now belongs to another process"
        return None


def say_line(msg: str) -> None:
    log.info(msg)


class Lock:
    """`Lock(path).acquire(wait=...)`, then `release()` (or `with Lock(path).acquire(...):`).

    wait=False (a run directory): a live holder raises Busy at once; a holder on another host with a recent
    heartbeat is watched for up to `stale_s`: Busy when it moves, broken when it does not.
    wait=True (preparing the data): waits for a live holder, saying who holds it at once and every
    `say_every_s`; Busy after `timeout_s`."""

    def __init__(self, path: Path, stale_s: float = STALE_S, beat_s: float = BEAT_S, say=say_line):
        self.path, self.stale_s, self.beat_s, self.say = Path(path), stale_s, beat_s, say
        self.line: str | None = None  # ours, while held
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(
        self,
        wait: bool,
        timeout_s: float | None = None,
        say_every_s: float = SAY_EVERY_S,
        poll_s: float = 0.2,
    ) -> Lock:
        t0 = time.monotonic()
        watched, said = None, None  # (holder, heartbeat, since when) of a holder judged by its heartbeat
        while not self._create():
            try:
                holder, beat = self._read()
            except FileNotFoundError:
                continue  # released meanwhile
            now = time.monotonic()
            by_pid = holder.host == HOST and holder.start is not None
            moved = False
            if by_pid:
                dead = holder.dead_here()
            elif time.time() - beat > self.stale_s:
                dead = f"its heartbeat is {time.time() - beat:.0f} s old"
            else:
                moved = watched is not None and watched[0] == holder and watched[1] != beat
                if watched is None or watched[0] != holder or moved:
                    watched = (holder, beat, now)
                dead = (
                    f"its heartbeat stood still for {self.stale_s:.0f} s"
                    if now - watched[2] > self.stale_s
                    else None
                )
            if dead:
                self._break(holder, dead)
                watched = said = None
                continue
            if not wait and (by_pid or moved):
                raise Busy(self.path, holder)
            if wait and timeout_s is not None and now - t0 > timeout_s:
                raise Busy(self.path, holder, f"waited {timeout_s:.0f} s for {self.path}, held by {holder}")
            if holder.host and (said is None or said[0] != holder or now - said[1] >= say_every_s):
                elsewhere = (
                    "" if by_pid else f"; taken over if its heartbeat stands still for {self.stale_s:.0f} s"
                )
                verb = "waiting for" if wait else "watching"
                self.say(f"{verb} {self.path}: held by {holder}{elsewhere}")
                said = (holder, now)
            time.sleep(poll_s)
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the file, when it is still ours (not broken and taken meanwhile)."""
        if self.line is None:
            return
        self._stop.set()
        self._beat.join()
        try:
            with open(self.path) as f:
                ours = f.read() == self.line
            if ours:
                os.unlink(self.path)
        except OSError:
            pass
        self.line = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        start = started(os.getpid())
        line = f"{HOST} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        line += f" start {start}\n" if start else "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, line.encode())
        except OSError:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self.line = line
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"heartbeat {self.path}", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone (broken as stale, its folder deleted) or a passing NFS error: nothing to do

    def _read(self) -> tuple[Holder, float]:
        """The holder and its heartbeat. open() makes NFS fetch the file's attributes afresh (close-to-open),
        so the mtime is the server's, not a cached one."""
        kind = os.lstat(self.path).st_mode
        if not stat.S_ISREG(kind):
            what = "a folder" if stat.S_ISDIR(kind) else "not a plain file"
            raise NotALock(f"{self.path} is {what}, not a lock file: move it away if nothing uses it")
        with open(self.path, errors="replace") as f:
            text, beat = f.read(400), os.fstat(f.fileno()).st_mtime
        holder = Holder.parse(text)
        if holder is None:
            raise NotALock(
                f"{self.path} is not a lock file of resnet_dist (it holds {text.strip()[:60]!r}): "
                "move it away if nothing uses it"
            )
        return holder, beat

    def _break(self, holder: Holder, why: str) -> None:
        """Take the file away under a name of our own, check it is still the dead holder's (not a lock
        another process made meanwhile, which is put back), then remove it."""
        aside = self.path.with_name(f"{self.path.name}.broken-{HOST}-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, errors="replace") as f:
                if f.read(400) != holder.text:
                    try:
                        os.link(aside, self.path)
                    except OSError:
                        pass
                    return
            self.say(f"note: removed the lock {self.path} of {holder}: {why}")
        finally:
            aside.unlink(missing_ok=True)
