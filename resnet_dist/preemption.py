"""Preemption: a signal (SIGTERM, SIGUSR1, Ctrl-C) on any rank -> all ranks agree on one step -> the trainer
saves a checkpoint and stops; the same command resumes."""

from __future__ import annotations

import os
import signal
from collections import deque

import torch
import torch.distributed as dist

from .distributed import DistEnv


class Preemption:
    """SIGTERM, SIGUSR1 and a first SIGINT (Ctrl-C) set a flag; all ranks agree to stop at the same step.
    A second SIGINT stops the process at once.

    The flag travels on the main process group, not on a second (gloo) group that would have to find its
    own network interface across nodes: every `every` steps each rank all-reduces its flag, and reads the
    result of one agreement at the next `lag`-th one. On GPUs the host copy lands in pinned memory behind a
    CUDA event (a few slots, allocated once), so the host waits for it only when it runs that far ahead of the
    GPU, and no collective runs in most steps (a captured step replays between them). A signal stops the run
    at most every x (lag + 1) steps later: 30 on GPUs (a fraction of a second), 2 on CPU, where steps are long
    and one tiny all-reduce a step costs nothing. One process needs no agreement: the flag is read directly.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, env: DistEnv, lag: int | None = None, every: int | None = None):
        self.received = False
        self.env = env
        self.cuda = env.device.type == "cuda"
        self.lag = lag if lag is not None else (2 if self.cuda else 1)
        self.every = every if every is not None else (10 if self.cuda else 1)
        self.pending: deque = deque()  # (work or event, tensor holding the reduced flag), oldest first
        self.slots = []  # on GPUs: (device flag, pinned host copy, event) for each agreement in flight
        if self.cuda and env.distributed:
            self.slots = [
                (torch.zeros(1, device=env.device), torch.empty(1, pin_memory=True), torch.cuda.Event())
                for _ in range(self.lag + 1)
            ]
        self.count = 0  # agreements started

    def install(self) -> Preemption:
        """Take over the signals (entry points call it; a benchmark or a test need not)."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:  # someone at a terminal: say what happens (os.write: safe in a handler)
            if self.received:
                os.write(2, b"interrupted twice: stopping without a checkpoint\n")
                os._exit(130)
            os.write(2, b"interrupted: saving a checkpoint at the next step (Ctrl-C again to stop at once)\n")
        self.received = True

    def agreed(self, step: int) -> bool:
        """True on every rank at the same step once any rank got a signal (call it after every step, with the
        global step count: all ranks agree at the same steps)."""
        if not self.env.distributed:
            return self.received
        if step % self.every:
            return False
        if self.cuda:
            flag, host, done = self.slots[self.count % len(self.slots)]
            flag.fill_(float(self.received))  # a kernel with the host's value: no sync
            dist.all_reduce(flag, async_op=True).wait()  # the current stream waits for it; the host does not
            host.copy_(flag, non_blocking=True)
            done.record()
            self.pending.append((done, host))
        else:
            flag = torch.full((1,), float(self.received))
            self.pending.append((dist.all_reduce(flag, async_op=True), flag))
        self.count += 1
        if len(self.pending) <= self.lag:
            return False
        return self._read(*self.pending.popleft())

    @staticmethod
    def _read(waitable, flag: torch.Tensor) -> bool:
        if isinstance(waitable, torch.cuda.Event):
            waitable.synchronize()
        else:
            waitable.wait()
        return bool(flag.item() > 0)

    def drain(self) -> bool:
        """Read every agreement still in flight; True if any of them agreed to stop (the same on every rank)."""
        if not self.env.distributed:
            return self.received
        stop = False
        while self.pending:
            stop |= self._read(*self.pending.popleft())
        return stop


class NoPreemption(Preemption):
    """Signals are not ours to handle (a benchmark, a test): never stops."""

    def __init__(self):
        self.received, self.pending = False, deque()

    def agreed(self, step: int) -> bool:
        return False

    def drain(self) -> bool:
        return False
