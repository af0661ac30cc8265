"""The loggers behind one small protocol (`log(record, media)`, `close()`): rank 0 gets real ones, the other
ranks a no-op. They only format and send what they are given: the console's epoch lines, metrics.jsonl (and
cutting it back on a resume), the progress bar; W&B and TensorBoard in their own modules."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import files
from .errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class EpochMedia:
    """What an epoch shows besides numbers: the test confusion matrix (rows true, columns predicted) and,
    when a logger asks for them (`wants_examples`), misclassified test images (image, true, predicted)."""

    epoch: int
    confusion: list[list[int]]
    misclassified: list[tuple] = field(default_factory=list)


# The scalars of a record, by the name a logger shows them under: an epoch record's train figures are the
# epoch's means, logged at the same step as the last interval's: they get their own names.
EPOCH_NAMES = {
    "train/loss": "train/epoch_loss",
    "train/acc": "train/epoch_acc",
    "images_per_s": "epoch_images_per_s",
    "lr": None,
}
NOT_SCALARS = ("kind", "step")


def scalars(record: dict) -> dict:
    """{name: value} of a step or epoch record, for W&B and TensorBoard (metrics.jsonl keeps the record).
    A value that is None (the accuracy of a class without test images) is left out: no chart point."""
    names = EPOCH_NAMES if record.get("kind") == "epoch" else {}
    out = {}
    for key, value in record.items():
        name = names.get(key, key)
        if name and key not in NOT_SCALARS and value is not None:  # None: not measured, not zero
            out[name] = value
    return out


class NullLogger:
    """What every rank but 0 gets: logging is a no-op, not an `if` in the loop."""

    wants_examples = False  # whether EpochMedia should carry misclassified images (they cost an inference)

    def log(self, record: dict, media: EpochMedia | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(NullLogger):
    """metrics.jsonl: one JSON object per line, flushed at once so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def log(self, record: dict, media: EpochMedia | None = None) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class MetricsError(UsageError):
    """metrics.jsonl is damaged where a crash cannot have damaged it (not its last line)."""


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records logged after `last_step` (written after the checkpoint a run resumes from), atomically.
    A torn last line (a crash in the middle of writing it) is dropped with a warning; a line that is not
    JSON anywhere else raises MetricsError."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):
                raise MetricsError(
                    f"{path} line {number} is not JSON (damaged by hand or by a tool): repair or delete that "
                    "line, or start over with checkpoint.resume=never"
                ) from None
            log.warning(f"dropped the torn last line of {path} (a crash while writing it)")
            break
        if record.get("step", 0) <= last_step:
            keep.append(line + "\n")
    files.write_text(path, "".join(keep))


def fmt(value: float | None) -> str:
    """A metric for a console line: 4 decimals, or "-" when it was not measured (None)."""
    return "-" if value is None else f"{value:.4f}"


class ConsoleLogger(NullLogger):
    """A plain line per epoch (the SLURM log reads well); step records only go to the other loggers."""

    def log(self, record: dict, media: EpochMedia | None = None) -> None:
        if record.get("kind") != "epoch":
            return
        log.info(
            f"epoch {record['epoch'] + 1} step {record['step']}: train loss {fmt(record['train/loss'])} "
            f"acc {fmt(record['train/acc'])} | test loss {record['test/loss']:.4f} acc {record['test/acc']:.4f} "
            f"({record['test/samples']} images) | {record['images_per_s']:.0f} img/s"
        )


class MultiLogger(NullLogger):
    def __init__(self, *loggers):
        self.loggers = loggers
        self.wants_examples = any(lg.wants_examples for lg in loggers)

    def log(self, record: dict, media: EpochMedia | None = None) -> None:
        for lg in self.loggers:
            lg.log(record, media)

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
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        leave=False,
        dynamic_ncols=sized,
        ncols=None if sized else 100,
        nrows=None if sized else 24,
    )
