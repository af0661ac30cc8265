"""The training meter, and the loggers behind one small protocol (`log(record, media)`, `close()`):
rank 0 gets real loggers, the other ranks a no-op. Loggers only format and send what they are given."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import files
from .distributed import all_gather_rows, all_reduce_sum
from .errors import RunError, UsageError
from .perf import Clock

log = logging.getLogger(__name__)


class TrainMeter:
    """Training loss and accuracy, the training clock, and each rank's own compute time, from step to log
    interval to epoch.

    `add()` keeps each step's (loss sum, correct) on the device: no host sync per step; `count_step()` folds
    them into the interval, unless fp16's loss scaler skipped the step (its loss may be inf: a step that left
    no trace in the weights leaves none in the loss either; amp/skipped counts it). `flush()` gathers the
    interval from all ranks in one collective (the interval's one host sync): the sums, and each rank's
    forward-pass time, the part of a step in which no rank waits for another (DDP's gradient all-reduce
    makes every rank's step as slow as the slowest), so that a straggler shows. The clock counts training
    time only: evaluation and checkpoints run inside `with meter.paused():`.
    """

    def __init__(self, device: torch.device, global_batch: int):
        self.global_batch = global_batch  # images per step over all ranks
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's open interval
        self.step_sums = torch.zeros(2, dtype=torch.float64, device=device)  # the step being taken
        self.steps = 0  # steps in the open interval (images/s counts them all)
        self.trained = 0  # of which the optimizer took (train/loss and train/acc average over these)
        # loss sum, correct, images of the epoch so far: already over all ranks
        self.epoch_sums = [0.0, 0.0, 0]
        self.epoch_steps = 0  # steps of the epoch so far (its images/s)
        self.epoch_s = self.interval_s = 0.0  # training seconds of the epoch / of the open interval
        self.train_s = 0.0  # training seconds of this process, all epochs
        self._mark: float | None = None  # when the clock was last read; None while it is stopped
        self.device_clock = Clock(device)  # CUDA events on GPUs: no sync until the flush
        self.busy: list[tuple] = []  # (start, end) marks of this rank's forward passes in the open interval

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """A (micro-)batch's mean loss and predictions: summed per image, on the device."""
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).sum()
            self.step_sums += torch.stack([loss.detach().double() * len(labels), correct.double()])

    def busy_since(self, start) -> None:
        """This rank worked alone from `start` (a device_clock mark) until now."""
        self.busy.append((start, self.device_clock.mark()))

    def fold(self) -> None:
        """The step's sums into the interval's (device work: a captured step replays it)."""
        self.sums += self.step_sums
        self.step_sums.zero_()

    def tally(self, trained: bool = True) -> None:
        """The host's count of one step: images/s counts it; its loss counts if the optimizer took it."""
        self.steps += 1
        self.trained += trained

    def count_step(self, trained: bool = True) -> None:
        """One step (all its micro-batches added); a skipped step's sums are dropped."""
        if trained:
            self.fold()
        else:
            self.step_sums.zero_()
        self.tally(trained)

    def _read_clock(self) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self.interval_s += now - self._mark
        self._mark = now

    def start_clock(self) -> None:
        self._mark = time.perf_counter()

    @contextmanager
    def paused(self):
        """Time spent inside is not training time (evaluation, checkpoints)."""
        self._read_clock()
        try:
            yield
        finally:
            self._mark = time.perf_counter()

    def flush(self) -> dict:
        """Gather the open interval from all ranks and close it: loss, accuracy and images/s over all ranks,
        the slowest and fastest rank's forward time, and their ratio (time/straggler)."""
        busy = sum(self.device_clock.seconds(a, b) for a, b in self.busy)
        busy_t = torch.tensor([busy], dtype=torch.float64, device=self.sums.device)
        rows = all_gather_rows(torch.cat([self.sums, busy_t])).tolist()  # [rank][loss sum, correct, busy]
        loss_sum, correct = sum(r[0] for r in rows), sum(r[1] for r in rows)
        slowest, fastest = max(r[2] for r in rows), min(r[2] for r in rows)
        self._read_clock()  # after the sync: the device has finished the interval's work
        n, trained = self.steps * self.global_batch, self.trained * self.global_batch
        self.epoch_sums = [
            self.epoch_sums[0] + loss_sum,
            self.epoch_sums[1] + correct,
            self.epoch_sums[2] + trained,
        ]
        interval = {
            "train/loss": loss_sum / trained if trained else None,  # None: fp16 skipped every step
            "train/acc": correct / trained if trained else None,
            "images_per_s": n / self.interval_s if self.interval_s > 0 else 0.0,
            "time/slowest_s": slowest,
            "time/fastest_s": fastest,
            "time/straggler": slowest / fastest if fastest > 0 else 1.0,
        }
        self.epoch_s += self.interval_s
        self.epoch_steps += self.steps
        self.train_s += self.interval_s
        self.sums.zero_()
        self.steps, self.trained, self.interval_s, self.busy = 0, 0, 0.0, []
        return interval

    def end_epoch(self) -> dict:
        """The epoch's loss, accuracy and images/s over all ranks; the next epoch starts from zero."""
        loss_sum, correct, n = self.epoch_sums  # n: the images of the steps the optimizer took
        images = self.epoch_steps * self.global_batch
        epoch = {
            "train/loss": loss_sum / n if n else None,
            "train/acc": correct / n if n else None,
            "images_per_s": images / self.epoch_s,
        }
        self.epoch_sums, self.epoch_steps, self.epoch_s = [0.0, 0.0, 0], 0, 0.0
        return epoch

    def state_dict(self) -> dict:
        """Collective (the open interval is summed over ranks), so a resume on any world size carries it.
        The open interval's time goes with its steps: a resumed interval's images/s counts both."""
        self._read_clock()
        loss_sum, correct = all_reduce_sum(self.sums.clone()).tolist()
        return {
            "interval": [loss_sum, correct],
            "interval_steps": self.steps,
            "interval_trained": self.trained,
            "interval_time": self.interval_s,
            "epoch_sums": list(self.epoch_sums),
            "epoch_steps": self.epoch_steps,
            "epoch_time": self.epoch_s,
        }

    def load_state_dict(self, state: dict, is_main: bool) -> None:
        self.sums.zero_()
        if is_main:  # the open interval was summed over ranks: rank 0 carries it alone
            self.sums += torch.tensor(state["interval"], dtype=torch.float64, device=self.sums.device)
        self.steps, self.trained = state["interval_steps"], state["interval_trained"]
        self.interval_s = state["interval_time"]
        self.epoch_sums, self.epoch_s = list(state["epoch_sums"]), state["epoch_time"]
        self.epoch_steps = state["epoch_steps"]


class Diverged(RunError):
    """The loss or the weights stopped being finite; every rank raises it at the same step."""

    every_rank = True


class LossGuard:
    """Stops a diverging run: the losses it checks are the ones already summed over ranks (each log interval,
    each epoch end), so every rank raises Diverged at the same step; it remembers the last finite loss."""

    def __init__(self, lr: float):
        self.lr, self.last = lr, None  # last: (step, loss) of the last finite check

    def check(self, step: int, *losses: float | None) -> None:
        """None: no loss was measured (fp16 skipped every step of the interval)."""
        bad = [v for v in losses if v is not None and not math.isfinite(v)]
        if bad:
            raise self.diverged(step, f"the loss is {bad[0]}")
        if losses[0] is not None:
            self.last = (step, losses[0])

    def diverged(self, step: int, what: str) -> Diverged:
        before = (
            f"last finite loss {self.last[1]:.4g} at step {self.last[0]}"
            if self.last
            else "no finite loss before"
        )
        return Diverged(
            f"training diverged at step {step}: {what} ({before}); no checkpoint was written with these weights. "
            f"Lower train.lr (now {self.lr:g}) or add warm-up, then resume from an earlier checkpoint or start "
            "over with checkpoint.resume=never"
        )


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
