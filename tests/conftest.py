"""Fixtures shared by the whole suite: the real Fashion-MNIST prepared once, and one short trained run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .helpers import call, small_run
from .slurm_cluster import slurm_cluster  # noqa: F401  (a session fixture of the SLURM tests)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    from resnet_dist.fashion_mnist import prepare

    root = tmp_path_factory.mktemp("data")
    prepare(str(root))
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_root) -> Path:
    """One epoch, one process, W&B off: a run directory with its checkpoint, metrics.jsonl and PNGs,
    trained once (in this process: `python -m resnet_dist.train`'s main) for every test that only reads a
    finished run."""
    from resnet_dist import train

    base = tmp_path_factory.mktemp("trained")
    code, _, err = call(train.main, *small_run(data_root, base, "t", "train.epochs=1"))
    assert code == 0, err
    return base / "t"


@pytest.fixture(autouse=True)
def _signal_handlers():
    """Entry points called in-process install their own handlers (preemption): put pytest's back after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
