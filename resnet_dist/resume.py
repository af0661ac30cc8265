"""Resuming with a config that differs from the checkpoint's: what each change does. One rule, one place.

Applied from the resume on: every key not listed below (epochs, the LR peak and schedule, optimizer settings,
augmentation, evaluation, precision, logging, checkpoint cadence, how BatchNorm is synchronised). Kept: the
checkpoint's value stays. Refused: the checkpoint's state would mean something else; the run stops before
anything is written. Evaluation and export need no rule: they rebuild the model from the checkpoint's config.
"""

from __future__ import annotations

import logging

from . import config
from .errors import UsageError

REFUSED = {
    "model": "the weights belong to the checkpoint's model",
    "data.resize": "the model was trained on the checkpoint's input size",
    "data.train_subset": "the epoch's position and the schedule count batches of the checkpoint's training set",
    "train.batch_size": "the epoch's position and the schedule count batches of the checkpoint's size",
}
KEPT = {"run.seed": "the data order and random streams come from the checkpoint"}
APPLIED = ("model.sync_bn",)  # how BatchNorm is computed, not what the weights are
NOT_COMPARED = ("run.dir", "run.name", "checkpoint.resume")

log = logging.getLogger(__name__)


class Refused(UsageError):
    """A resume that cannot apply a change (or a run that must not start): exit 2, nothing written."""

    every_rank = True  # rank 0 decided it for all


def changes(saved: dict, cfg: config.Config) -> list[tuple[str, object, object, str]]:
    """(key, checkpoint's value, this run's value, verdict) for each key that differs; verdict is "applied",
    "kept" (the checkpoint's value stays, and `cfg` is set to it) or "refused: <why>"."""
    old, new = config.flat(saved), config.flat(cfg.to_dict())
    found = []
    for key in sorted(new):
        if key in NOT_COMPARED or key not in old or old[key] == new[key]:
            continue
        group = next((g for g in REFUSED if key == g or key.startswith(g + ".")), None)
        if group and key not in APPLIED:
            verdict = f"refused: {REFUSED[group]}"
        elif key in KEPT:
            verdict = f"kept: {KEPT[key]}"
            config.set_key(cfg, key, old[key])
        else:
            verdict = "applied"
        found.append((key, old[key], new[key], verdict))
    return found


def reconcile(cfg: config.Config, saved: dict) -> None:
    """One `config: KEY OLD -> NEW: VERDICT` line per changed key (rank 0's log); Refused when any cannot apply."""
    found = changes(saved, cfg)
    for key, old, new, verdict in found:
        log.info(f"config: {key} {old!r} -> {new!r}: {verdict}")
    refused = [key for key, *_, verdict in found if verdict.startswith("refused")]
    if refused:
        raise Refused(
            f"cannot resume with a changed {', '.join(refused)} (see the config: lines above): "
            "resume with the checkpoint's values, or start a new run (another run.name)"
        )
