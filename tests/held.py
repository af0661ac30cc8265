"""`python -m tests.held ARGS...`: `python -m resnet_dist.train ARGS...` held at known points, so that a test
that sends a signal, kills a process or starts a second run knows where the run is: the order of two events
is made certain rather than hoped for. The signals, kills and processes stay real. Set in the environment:

  HOLD       the points, in order, separated by commas; each one of
             "step N": before the step after step N (step N logged; its checkpoint, and at an epoch's end the
                 evaluation and checkpoint, written). "step 0" in a fresh run: the run directory open and
                 locked, the signal handlers installed, nothing trained.
             "stop": a signal has stopped the loop, before the checkpoint it asks for is written.
             Each followed by "until signal" (until this process gets a signal, its handler having run: then the
             run goes on) or not (until the process is killed or stops itself, as at a second Ctrl-C).
  HOLD_DIR   a folder: holding at a point creates the point's marker there (`marker()` names it), which the test
             waits for. A process holds at a point only while its marker does not exist: a restarted or resumed
             run goes on without holding again.
  HOLD_RANK  the rank that holds (default 0; empty: every rank); the others wait for it in their next
             collective.
  HOLD_IF    NAME=VALUE: only a process with that in its environment holds (one task of a SLURM job array).

Under a launcher that runs `-m resnet_dist.train` itself (a launch script, sbatch), tests/hold_site on
PYTHONPATH installs the same hold (helpers.hold(..., site=True)).

A hold ends after LIMIT_S in any case, as a deadline: the run then goes on and the test fails on what follows.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

LIMIT_S = 300.0
received: list[int] = []  # the signals this process got, once their handlers ran


def marker(folder: Path, point: str) -> Path:
    """The file that says a run is held at `point` ("step 3", "stop")."""
    return Path(folder) / point.split(" until ")[0].strip().replace(" ", "-")


def _count_signals() -> None:
    """Every handler installed from now on records its signal first, then does what it does."""
    install = signal.signal

    def counting(sig, handler):
        if callable(handler):
            inner = handler

            def handler(signum, frame):
                received.append(signum)
                return inner(signum, frame)

        return install(sig, handler)

    signal.signal = counting


def _hold(at: Path, until_signal: bool) -> None:
    seen = len(received)
    at.touch()
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline and not (until_signal and len(received) > seen):
        time.sleep(0.02)


def install(env=os.environ) -> None:
    from resnet_dist.trainer import Trainer

    folder, rank = Path(env["HOLD_DIR"]), env.get("HOLD_RANK", "0")
    name, _, value = env.get("HOLD_IF", "").partition("=")
    if name and env.get(name) != value:
        return
    steps, stop = {}, None  # step -> (marker, until a signal); the stop's (marker, until a signal)
    for point in env["HOLD"].split(","):
        what, _, until = point.strip().partition(" until ")
        assert until in ("", "signal"), point
        held = (marker(folder, point), until == "signal")
        if what == "stop":
            stop = held
        else:
            word, n = what.split()
            assert word == "step", point
            steps[int(n)] = held

    def hold(trainer, held) -> None:
        if held is not None and rank in ("", str(trainer.env.rank)) and not held[0].exists():
            _hold(*held)

    train_step, stop_run = Trainer.train_step, Trainer.stop

    def held_step(self, *args, **kwargs):
        hold(self, steps.get(self.global_step))
        return train_step(self, *args, **kwargs)

    def held_stop(self, *args, **kwargs):
        hold(self, stop)
        return stop_run(self, *args, **kwargs)

    Trainer.train_step, Trainer.stop = held_step, held_stop


if __name__ == "__main__":
    _count_signals()
    install()
    from resnet_dist import train

    sys.exit(train.main(sys.argv[1:]))
