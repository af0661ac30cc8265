"""What training measures: the meter (loss, accuracy and time, from step to log interval to epoch, summed over
ranks once per interval) and the guard that stops a diverging run on what the meter measured."""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import torch

from .distributed import all_gather_rows, all_reduce_sum
from .errors import RunError
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
