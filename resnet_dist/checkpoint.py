"""Checkpoints that describe themselves and are written atomically; loading never runs code; the random
streams they carry.

Files: `step-00001234.pt` (the newest `checkpoint.keep` are kept) and `last.pt`, the newest.
Each is written to a temporary file, flushed, fsynced and `os.replace`d: a reader (or a crash)
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import files
from .config import CheckpointConfig
from .errors import RunError, UsageError, first_line

log = logging.getLogger(__name__)

STEP_FILE = re.compile(r"step-(\d+)\.pt$")


class CheckpointError(UsageError):
    """A checkpoint that cannot be used (missing, truncated, incomplete, another model, not finite): exit 2."""


class SaveError(RunError):
    """A checkpoint that could not be written (a full disk): exit 1; the previous one stays."""

    every_rank = True  # rank 0 tells every rank whether it could write


def atomic_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)  # in memory first: a failed write then raises the OSError itself (ENOSPC, EIO...),
    files.atomic_write(path, lambda tmp: tmp.write_bytes(buf.getbuffer()))  # not torch's "unexpected pos"


def save(state: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """Write `state` as step-<step>.pt and last.pt; keep the newest `keep` step files. A failed write (a full
    disk) leaves the previous files as they were and raises CheckpointError in one line."""
    path = ckpt_dir / f"step-{step:08d}.pt"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_save(state, path)
    except OSError as e:
        previous = next((p.stem for p in step_files(ckpt_dir) if p != path), None)
        kept = f"{previous} is kept" if previous else "no earlier checkpoint exists"
        raise SaveError(f"could not write {path.stem}: {e.strerror or e}; {kept}") from None
    last_tmp = ckpt_dir / f".last.pt.tmp-{os.getpid()}"
    try:
        os.link(path, last_tmp)  # a second name for the same bytes, swapped in atomically
        os.replace(last_tmp, ckpt_dir / "last.pt")
    except OSError:
        last_tmp.unlink(missing_ok=True)
        atomic_save(state, ckpt_dir / "last.pt")  # filesystems without hard links
    for old in step_files(ckpt_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def step_files(ckpt_dir: Path) -> list[Path]:
    """step-*.pt files, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def finite(state: dict) -> bool:
    """True when the model's (and the EMA's) floating-point tensors are all finite: not a diverged run."""
    tensors = [t for t in state["model"].values() if t.is_floating_point()]
    if state.get("ema"):
        tensors += [t for t in state["ema"]["weights"].values() if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


NUMBER = (int, float)
TENSORS = "tensors"  # a dict of tensors (a state_dict)
# Every key that evaluate, export, predict, plots or a resume reads, with its type (a dict: its own keys, a
# list [T]: every item a T). Keys that older checkpoints lack are read with .get and listed in OPTIONAL.
SCHEMA = {
    "model": TENSORS,
    "config": {"model": dict},  # the whole config is checked by config.from_dict
    "progress": {
        "epoch": int,
        "step_in_epoch": int,
        "global_step": int,
        "sampler_seed": int,
        "interval": list,
        "interval_steps": int,
        "interval_trained": int,
        "interval_time": NUMBER,
        "epoch_sums": list,
        "epoch_steps": int,
        "epoch_time": NUMBER,
    },
    "optimizer": {"state": dict, "param_groups": list},
    "rng": [{"torch": torch.Tensor, "numpy": list, "python": tuple}],
}
OPTIONAL = {
    "scaler": {"scaler": dict, "skipped": int, "interval_skipped": int, "in_a_row": int},  # or None: not fp16
    "ema": {"weights": TENSORS, "n_averaged": (int, torch.Tensor)},  # or None: no EMA
    "history": [{"epoch": int, "confusion": list}],
}


def schema_problem(value, want, name: str) -> str | None:
    """What in `value` does not match `want` (see SCHEMA), named by its dotted key; None when all does."""
    if want == TENSORS:
        if not isinstance(value, dict) or not all(isinstance(t, torch.Tensor) for t in value.values()):
            return f"'{name}' is not a dict of tensors"
        return None
    if isinstance(want, list):
        if not isinstance(value, list):
            return f"'{name}' is a {type(value).__name__}, not a list"
        return next(
            (p for i, v in enumerate(value) if (p := schema_problem(v, want[0], f"{name}[{i}]"))), None
        )
    if isinstance(want, dict):
        if not isinstance(value, dict):
            return f"'{name}' is a {type(value).__name__}, not a dict"
        for key, sub in want.items():
            if key not in value:
                return f"'{name}.{key}' is missing"
            if problem := schema_problem(value[key], sub, f"{name}.{key}"):
                return problem
        return None
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        return f"'{name}' is a {type(value).__name__}, not {getattr(want, '__name__', 'a number')}"
    return None


def structure_problem(state) -> str | None:
    """What keeps `state` from being a usable checkpoint (a missing key, a wrong type, a config this package
    cannot read), or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint's dict"
    for key, want in SCHEMA.items():
        if key not in state:
            return f"'{key}' is missing"
        if problem := schema_problem(state[key], want, key):
            return problem
    for key, want in OPTIONAL.items():
        if state.get(key) is not None and (problem := schema_problem(state[key], want, key)):
            return problem
    from . import config  # a leaf module: no cycle
    from .model import build_model

    try:
        model_cfg = config.from_dict(state["config"]).model
    except config.ConfigError as e:
        return f"its config is not usable ({e})"
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {k: t.shape for k, t in build_model(model_cfg).state_dict().items()}
    ema = [("ema.weights", state["ema"]["weights"])] if state.get("ema") else []
    return next(
        (p for name, w in [("model", state["model"]), *ema] if (p := fit_problem(name, w, expected))), None
    )


def fit_problem(name: str, weights: dict, expected: dict) -> str | None:
    """How a state_dict differs from the tensor names and shapes its model config needs, or None."""
    missing, extra = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or extra:
        listed = [
            f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("lacks", missing), ("has unknown", extra))
            if keys
        ]
        return f"'{name}' does not fit its model config: it {' and '.join(listed)}"
    bad = next((k for k, shape in expected.items() if weights[k].shape != shape), None)
    if bad:
        return f"'{name}.{bad}' has shape {list(weights[bad].shape)}, its model config needs {list(expected[bad])}"
    return None


def load(path: Path) -> dict:
    """Load with `weights_only=True`: tensors and plain values only, so a crafted pickle cannot run code.
    A file that is not a complete checkpoint (every key the tools read, of the right type), or whose weights
    are not finite, raises CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or unsafe all mean "not usable"
        with open(path, "rb") as f:  # torch.save writes a zip archive (a pickle before torch 1.6)
            saved = f.read(2) in (b"PK", b"\x80\x02")
        why = first_line(e) if saved else "not a file that torch.save wrote"
        raise CheckpointError(f"{path}: not a valid checkpoint ({why})") from None
    if problem := structure_problem(state):
        raise CheckpointError(f"{path}: not a complete resnet_dist checkpoint: {problem}")
    if not finite(state):
        raise CheckpointError(f"{path}: its weights are not finite (a diverged run): not usable")
    return state


def load_newest(ckpt_dir: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads: the newest valid step file, or last.pt when it is newer (the step
    files deleted by hand or by a cleanup). Each unusable file is reported in one line and skipped."""
    found = None
    for path in step_files(ckpt_dir):
        try:
            found = (load(path), path)
            break
        except CheckpointError as e:
            log.warning(f"{e}; trying the previous one")
    last = ckpt_dir / "last.pt"
    if last.is_file() and not (found and last.samefile(found[1])):  # normally a second name of the newest
        try:
            state = load(last)
            if found is None or state["progress"]["global_step"] > found[0]["progress"]["global_step"]:
                found = (state, last)
        except CheckpointError as e:
            log.warning(str(e))
    return found


def any_checkpoint(ckpt_dir: Path) -> bool:
    return bool(step_files(ckpt_dir)) or (ckpt_dir / "last.pt").is_file()


def evaluated_weights(state: dict) -> dict:
    """The weights a checkpoint's run evaluated: its EMA when it had one, else the model."""
    return state["ema"]["weights"] if state.get("ema") else state["model"]


def rng_state(gen: torch.Generator) -> dict:
    """Every random stream of this rank, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    return {
        "augment": gen.get_state(),
        "augment_device": gen.device.type,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict, gen: torch.Generator) -> bool:
    """Restore every stream. False when the augmentation stream was saved on another kind of device (a CPU
    generator's state does not load into a CUDA one, nor the other way round): the caller reseeds it."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if state.get("augment_device", "cpu") != gen.device.type:  # checkpoints before this key: all from CPU
        return False
    try:
        gen.set_state(state["augment"])
    except RuntimeError:
        return False
    return True


def restore_rng(rngs: list, rank: int, gen: torch.Generator, fresh_seed: int, say: bool) -> None:
    """Restore this rank's streams from a checkpoint's; a rank without one (added by a resize) or one saved
    on another kind of device gets `fresh_seed`, and on a device change one line says so (when `say`)."""
    if rank < len(rngs) and set_rng_state(rngs[rank], gen):
        return
    gen.manual_seed(fresh_seed)
    saved_on = rngs[0].get("augment_device", "cpu") if rngs else gen.device.type
    if say and saved_on != gen.device.type:
        log.info(
            f"note: the checkpoint's augmentation random streams were saved on {saved_on} and cannot be "
            f"restored on {gen.device.type}: reseeded from run.seed and the step (the run goes on, not "
            "bit-identical to an uninterrupted one)"
        )


class SaveCadence:
    """When epoch ends save: the last epoch always; others every `every_epochs`, unless saving would take more
    than `max_overhead` of the time since the previous save (fast GPUs, tiny epochs): a minimum interval of
    (1 / max_overhead - 1) times the last save's duration, on this process's clock (the trainer lets rank 0's
    decide for all: every rank takes part in a save). `timed()` wraps each save to measure it."""

    def __init__(self, cfg: CheckpointConfig, epochs: int):
        self.cfg, self.epochs = cfg, epochs
        self.last_s, self.last_end = 0.0, time.perf_counter()
        self.total_s = 0.0  # this process's seconds spent saving

    def due(self, epochs_done: int) -> bool:
        if epochs_done >= self.epochs:
            return True
        if epochs_done % self.cfg.every_epochs:
            return False
        since = time.perf_counter() - self.last_end
        return self.last_s <= self.cfg.max_overhead * (since + self.last_s)

    @contextmanager
    def timed(self):
        start = time.perf_counter()
        yield
        self.last_end = time.perf_counter()
        self.last_s = self.last_end - start
        self.total_s += self.last_s
