"""`log.profile=SKIP:RECORD`: torch.profiler on every rank for a window of training steps.

One trace per rank in `<run dir>/profile/rank<R>.pt.trace.json` (Perfetto, chrome://tracing and TensorBoard's
profiler plugin open it), and on rank 0 a table of the top operators by self time with the share of the step
spent in communication. Off by default: the Trainer then holds a NoProfiler, whose step() does nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

log = logging.getLogger(__name__)

COMM_OPS = ("all_reduce", "allreduce", "all_gather", "allgather", "broadcast", "nccl", "gloo")


class NoProfiler:
    def step(self) -> None:
        pass

    def close(self) -> None:
        pass


class StepProfiler(NoProfiler):
    def __init__(self, spec: str, out_dir: Path, rank: int, device: torch.device, is_main: bool):
        skip, record = (int(v) for v in spec.split(":"))
        self.out, self.rank, self.is_main = out_dir, rank, is_main
        self.cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # the step before the window warms the profiler up (its first recorded step carries a start-up cost)
        schedule = torch.profiler.schedule(
            wait=max(skip - 1, 0), warmup=min(skip, 1), active=record, repeat=1
        )
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=self._ready,
            record_shapes=False,
            profile_memory=True,
        )
        self.steps_left = skip + record
        self.prof.start()

    def step(self) -> None:
        """After each optimizer step; the profiler stops for good once its window is written."""
        if self.prof is None:
            return
        self.prof.step()
        self.steps_left -= 1
        if self.steps_left <= 0:
            self.close()

    def close(self) -> None:
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()

    def _ready(self, prof) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank{self.rank}.pt.trace.json"
        prof.export_chrome_trace(str(path))
        if self.is_main:
            log.info(summary(prof, self.cuda))
            log.info(f"profile: one trace per rank in {self.out} (open in https://ui.perfetto.dev)")


def summary(prof, cuda: bool) -> str:
    """The top operators by self time, and the communication share of the profiled steps."""
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=10)
    comm = sum(getattr(e, key) for e in events if any(op in e.key.lower() for op in COMM_OPS))
    steps = sum(e.cpu_time_total for e in events if e.key.startswith("ProfilerStep"))
    where = "device" if cuda else "CPU"
    share = f"{100 * comm / steps:.1f}%" if steps else "n/a"
    return (
        f"{table}\nprofile: communication ops took {comm / 1e3:.1f} ms of {where} time, {share} of the "
        f"profiled steps' {steps / 1e3:.1f} ms (overlapping ops count in full)"
    )
