"""Loggers behind one small protocol (`log(record)`, `close()`); rank 0 gets real ones, others a no-op."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class NullLogger:
    """What every rank but 0 gets: logging is a no-op, not an `if` in the loop."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(NullLogger):
    """metrics.jsonl: one JSON object per line, flushed at once so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def log(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records logged after `last_step` (written after the checkpoint a run resumes from), atomically."""
    if not path.exists():
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


class ConsoleLogger(NullLogger):
    """A plain line per epoch (the SLURM log reads well); step records only go to the other loggers."""

    def log(self, record: dict) -> None:
        if record.get("kind") != "epoch":
            return
        print(f"epoch {record['epoch'] + 1} step {record['step']}: train loss {record['train/loss']:.4f} "
              f"acc {record['train/acc']:.4f} | test loss {record['test/loss']:.4f} acc {record['test/acc']:.4f} "
              f"({record['test/samples']} images) | {record['images_per_s']:.0f} img/s", flush=True)


class MultiLogger(NullLogger):
    def __init__(self, *loggers):
        self.loggers = loggers

    def log(self, record: dict) -> None:
        for lg in self.loggers:
            lg.log(record)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class NullProgress:
    """Stands in for the tqdm bar off a terminal and on ranks other than 0."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, mode: str, total: int, desc: str, initial: int = 0):
    """tqdm on rank 0 when stdout is a terminal (or `log.progress=bar`), otherwise a no-op."""
    if not enabled or mode == "lines" or (mode == "auto" and not sys.stdout.isatty()):
        return NullProgress()
    from tqdm import tqdm
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    # a terminal that reports no size (some `srun --pty` sessions) would hide the bar: assume 100x24
    sized = size.columns > 0 and size.lines > 0
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=sized,
                ncols=None if sized else 100, nrows=None if sized else 24)
