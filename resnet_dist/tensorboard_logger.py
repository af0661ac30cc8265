"""`log.tensorboard=true`: rank 0 writes the scalars of metrics.jsonl, and each epoch's confusion matrix as an
image, into `<run dir>/tensorboard/` (`tensorboard --logdir runs/NAME/tensorboard`).

A resumed run appends a new event file from the checkpoint's step on, with TensorBoard's purge marker: the
reader then drops what the interrupted run logged after that step, so no step shows twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .loggers import EpochMedia, NullLogger, scalars

log = logging.getLogger(__name__)


def start(run_dir: Path, resumed_step: int | None):
    """A TensorBoardLogger, or None with one warning line when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log.warning(f"log.tensorboard=true but TensorBoard is not installed ({e}): pip install tensorboard")
        return None
    purge = resumed_step + 1 if resumed_step is not None else None  # the first step logged again
    return TensorBoardLogger(SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge))


class TensorBoardLogger(NullLogger):
    def __init__(self, writer):
        self.writer = writer

    def log(self, record: dict, media: EpochMedia | None = None) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        if media is not None:
            from .plots import confusion_figure

            title = f"test confusion matrix, epoch {media.epoch + 1}"
            self.writer.add_figure("test/confusion", confusion_figure(media.confusion, title), record["step"])
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self) -> None:
        self.writer.close()
