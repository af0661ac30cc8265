"""Config: built-in defaults <- YAML file <- KEY=VALUE overrides, validated before anything runs. Every knob is
declared once below, with its default and a one-line doc; `load()` raises ConfigError in one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

import yaml

from .configfile import read_yaml
from .errors import ConfigError


def knob(default, doc: str, rule: tuple | None = None, choices: tuple = (), path: bool = False):
    """A config field: its default, a one-line doc, and optionally a validity rule (check, what it must be), the
    allowed values, or `path`: a path, whose leading `~` is expanded wherever the value comes from."""
    check, msg = rule or (None, "")
    meta = {"doc": doc, "choices": choices, "check": check, "msg": msg, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


positive = (lambda v: v > 0, "must be > 0")
non_negative = (lambda v: v >= 0, "must be >= 0")
null_or_positive = (lambda v: v is None or v > 0, "must be null or > 0")
fraction = (lambda v: 0 <= v < 1, "must be in [0, 1)")
probability = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
up_to_one = (lambda v: 0 < v <= 1, "must be in (0, 1]")
folder_name = (
    lambda v: v is None or (v not in ("", ".", "..") and "/" not in v and "\\" not in v),
    "must be a plain folder name (no '/', not '..')",
)
skip_record = (
    lambda v: v is None or re.fullmatch(r"\d+:[1-9]\d*", v) is not None,
    "must be SKIP:RECORD (RECORD >= 1)",
)


# one knob, one line: a table to read (past the line length where a doc needs it)
# fmt: off
@dataclass
class RunConfig:
    dir: str = knob("runs", "parent folder of run directories", path=True)
    name: str | None = knob(None, "run directory name; null = $SLURM_JOB_ID (ARRAYJOB_TASK in an array), else a timestamp", folder_name)
    seed: int = knob(0, "base random seed (each rank derives its own augmentation stream)")
    deterministic: bool = knob(False, "deterministic kernels only (torch.use_deterministic_algorithms, cuDNN autotuner off): slower")


@dataclass
class DataConfig:
    root: str = knob("data", "where the prepared dataset lives", path=True)
    mirror: str | None = knob(None, "folder with the four original .gz files; null = Debian's copy if present", path=True)
    train_subset: int | None = knob(None, "null = whole train split; N = the first N images", null_or_positive)
    test_subset: int | None = knob(None, "null = whole test split; N = the first N images", null_or_positive)
    resize: int | None = knob(None, "null = native 28x28; 224 reproduces the original recipe", null_or_positive)
    crop_padding: int = knob(0, "random-crop padding in pixels (0 = no crop augmentation)", non_negative)
    flip: bool = knob(False, "random horizontal flip")
    erasing: float = knob(0.0, "probability of random erasing per image", probability)
    eval_batch_size: int = knob(1024, "per-rank batch size for evaluation", positive)


@dataclass
class ModelConfig:
    stem: str = knob("imagenet", "imagenet (7x7/2 conv + 3x3/2 max-pool) or cifar (3x3/1 conv, no pool)", choices=("imagenet", "cifar"))
    init: str = knob("xavier", "weight init: xavier (original) or kaiming", choices=("xavier", "kaiming"))
    sync_bn: bool = knob(False, "BatchNorm statistics over the whole global batch under DDP (SyncBatchNorm, GPUs)")


@dataclass
class TrainConfig:
    epochs: int = knob(10, "number of epochs", positive)
    batch_size: int = knob(256, "GLOBAL batch size over all ranks", positive)
    accum_steps: int = knob(1, "micro-batches per optimizer step on each rank (gradient accumulation); the global batch stays", positive)
    lr: float = knob(0.05, "peak learning rate", positive)
    momentum: float = knob(0.0, "SGD momentum", fraction)
    nesterov: bool = knob(False, "Nesterov momentum (needs momentum > 0)")
    weight_decay: float = knob(0.0, "weight decay (never applied to BatchNorm weights and biases)", non_negative)
    schedule: str = knob("constant", "LR schedule: constant (original), onecycle, cosine (warmup + cosine)", choices=("constant", "onecycle", "cosine"))
    warmup: float = knob(0.0, "fraction of training spent warming up (onecycle, cosine)", fraction)
    label_smoothing: float = knob(0.0, "label smoothing of the cross-entropy", fraction)
    precision: str = knob("auto", "auto, bf16, fp16 or fp32 (auto: bf16 / fp16 on GPU, fp32 on CPU)", choices=("auto", "bf16", "fp16", "fp32"))
    cuda_graphs: str = knob("auto", "capture the step and the evaluation as CUDA graphs: auto (one GPU, bf16/fp32), on (also 2+ GPUs: unverified), off", choices=("auto", "on", "off"))
    ema_decay: float = knob(0.0, "evaluate an exponential moving average of the weights with this decay (0 = off)", fraction)
    tta_flip: bool = knob(False, "test-time augmentation: average the logits of each image and its mirror")


@dataclass
class DistConfig:
    backend: str = knob("auto", "process-group backend: auto (nccl on GPUs, gloo on CPU), nccl, or gloo (on GPUs: several ranks may share one)", choices=("auto", "nccl", "gloo"))
    timeout_s: int = knob(600, "collective timeout in seconds: a dead peer fails the others after this", positive)
    bucket_mb: int = knob(25, "DDP gradient bucket size in MiB (ResNet-18 has ~45 MB of fp32 gradients)", positive)
    grad_compression: str = knob("none", "DDP communication hook: none, or bf16 (halves all-reduce bytes)", choices=("none", "bf16"))


@dataclass
class CheckpointConfig:
    resume: str = knob("auto", "auto (newest valid checkpoint of the run directory), never, or a path", path=True)
    keep: int = knob(2, "how many step checkpoints to keep (last.pt is the newest)", positive)
    every_steps: int = knob(0, "also save every N steps (0 = only at epoch ends)", non_negative)
    every_epochs: int = knob(1, "save at the end of every N-th epoch (the last epoch always saves)", positive)
    max_overhead: float = knob(0.05, "skip an epoch-end save while saving would take more than this share of the time since the previous one (1 = never skip)", up_to_one)
    requeue: bool = knob(True, "under SLURM, after a preemption signal rank 0 requeues the job (needs sbatch --requeue)")


@dataclass
class WandbConfig:
    mode: str = knob("auto", "auto (online if an API key is configured, else offline), online, offline or disabled; WANDB_MODE wins", choices=("auto", "online", "offline", "disabled"))
    project: str = knob("resnet_dist", "W&B project")
    entity: str | None = knob(None, "W&B entity (team or user); null = your default")
    group: str | None = knob(None, "W&B group; null = the SLURM (array) job id, else the run name")
    name: str | None = knob(None, "W&B run display name; null = the run name (run directory)")
    tags: list[str] = knob([], "W&B tags, e.g. log.wandb.tags=[baseline,bf16]")
    init_timeout_s: int = knob(30, "give up connecting to the W&B server after this and log offline", positive)
    log_model: bool = knob(False, "at the end of a finished run, log model.safetensors + model.json as a W&B model artifact")


@dataclass
class LogConfig:
    every_steps: int = knob(50, "train metrics are all-reduced and logged every N steps", positive)
    progress: str = knob("auto", "auto (tqdm bar on a terminal, a line per epoch otherwise), bar, lines", choices=("auto", "bar", "lines"))
    profile: str | None = knob(None, "SKIP:RECORD: torch.profiler traces of RECORD steps after SKIP, on every rank, in <run dir>/profile/", skip_record)
    tensorboard: bool = knob(False, "rank 0 also writes the scalars and confusion matrices to <run dir>/tensorboard/")
    wandb: WandbConfig = field(default_factory=WandbConfig)
# fmt: on


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def set_key(node, dotted: str, value, path: str = "") -> None:
    """Set `dotted` (a.b.c) on the dataclass tree `node`, type-checking the value."""
    head, _, rest = dotted.partition(".")
    key = f"{path}{head}"
    fields = {f.name: f for f in dataclasses.fields(node)}
    if head not in fields:
        raise ConfigError(f"unknown config key '{key}' (known: {', '.join(fields)})")
    hints = typing.get_type_hints(type(node))
    current = getattr(node, head)
    if dataclasses.is_dataclass(current):
        if rest:
            return set_key(current, rest, value, key + ".")
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section: give a mapping, not {value!r}")
        for k, v in value.items():
            set_key(current, str(k), v, key + ".")
        return
    if rest:
        raise ConfigError(f"unknown config key '{key}.{rest}' ('{key}' is not a section)")
    setattr(node, head, _coerce(key, hints[head], value, fields[head].metadata))


class Raw(str):
    """The text of a KEY=VALUE override: a str key takes it as written (run.name=on stays "on"),
    any other key parses it as a YAML scalar."""


def _coerce(key: str, hint, value, meta):
    if isinstance(value, Raw):
        value = str(value) if meta.get("path") and value.startswith("~") else _parse_raw(value, hint)
    if typing.get_origin(hint) is list:  # list[str]: a YAML list of scalars
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v, {}) for i, v in enumerate(value)]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if value is None:
        if not optional:
            raise ConfigError(f"config key '{key}' must not be null")
        return None
    if base is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string: take every spelling Python's float() takes
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # run.name=12345 (a job id) parses as an int
    if meta.get("path") and isinstance(value, str):
        value = os.path.expanduser(value)
    if base is int and isinstance(value, bool) or not isinstance(value, base):
        raise ConfigError(f"config key '{key}' must be {base.__name__}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(meta['choices'])}; got {value!r}")
    if meta.get("check") and not meta["check"](value):
        raise ConfigError(f"config key '{key}' {meta['msg']}; got {value!r}")
    return value


def _parse_raw(raw: str, hint):
    text = raw.strip()
    if text in ("", "null", "~", "Null", "NULL"):
        return None
    if hint is str or (
        typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint)
    ):
        return str(raw)  # str and str | None, not list[str]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return str(raw)


def parse_override(text: str) -> tuple[str, Raw]:
    """`a.b=VALUE` -> ("a.b", Raw("VALUE")); the key's type decides how VALUE is read."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not KEY=VALUE")
    return key.strip(), Raw(raw)


def from_dict(data: dict, cfg: Config | None = None) -> Config:
    """Apply a nested or dotted mapping (a YAML file, a checkpoint's config) over `cfg` (default: the defaults)."""
    cfg = Config() if cfg is None else cfg
    for k, v in data.items():
        set_key(cfg, str(k), v)
    return cfg


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """KEY=VALUE overrides over `cfg`, each typed by its key."""
    for text in overrides:
        set_key(cfg, *parse_override(text))
    return cfg


def validate(cfg: Config) -> None:
    """Checks that span several keys, or look at the filesystem."""
    train = cfg.train
    if train.nesterov and train.momentum <= 0:
        raise ConfigError("config key 'train.nesterov' needs train.momentum > 0")
    if train.schedule == "constant" and train.warmup > 0:
        raise ConfigError("config key 'train.warmup' needs train.schedule onecycle or cosine")
    if cfg.checkpoint.resume not in ("auto", "never") and not os.path.isfile(cfg.checkpoint.resume):
        raise ConfigError(f"config key 'checkpoint.resume': no checkpoint file at {cfg.checkpoint.resume!r}")
    if cfg.data.mirror is not None and not os.path.isdir(cfg.data.mirror):
        raise ConfigError(f"config key 'data.mirror': no folder at {cfg.data.mirror!r}")


TRAIN_IMAGES = 60_000  # Fashion-MNIST's training split


def check_world(cfg: Config, world_size: int) -> None:
    """Checks that need the world size, which the entry point learns from the launcher (config stays a leaf)."""
    train = cfg.train
    if train.batch_size % world_size:
        raise ConfigError(
            f"config key 'train.batch_size' ({train.batch_size}) must be divisible by the world size "
            f"({world_size})"
        )
    per_rank = train.batch_size // world_size
    if per_rank % train.accum_steps:
        raise ConfigError(
            f"config key 'train.accum_steps' ({train.accum_steps}) must divide the per-rank batch ({train.batch_size} "
            f"over {world_size} ranks = {per_rank})"
        )
    if per_rank // train.accum_steps < 2:
        key, value, where = ("train.batch_size", train.batch_size, f"per rank on {world_size} ranks")
        if train.accum_steps > 1:
            key, value = "train.accum_steps", train.accum_steps
            where = f"per micro-batch ({per_rank} per rank in {train.accum_steps} micro-batches)"
        raise ConfigError(
            f"config key '{key}' ({value}) gives {per_rank // train.accum_steps} image {where}: "
            "BatchNorm cannot train on one image; use at least 2"
        )
    images = min(cfg.data.train_subset or TRAIN_IMAGES, TRAIN_IMAGES)
    if per_rank > images // world_size:
        raise ConfigError(
            f"config key 'train.batch_size' ({train.batch_size}) needs {per_rank} training images per rank, but "
            f"{images} images give each of {world_size} rank(s) {images // world_size}: lower the batch or "
            "raise data.train_subset"
        )


def load(
    path: str | None = None, overrides: typing.Sequence[str] = (), world_size: int | None = None
) -> Config:
    """Defaults <- YAML file <- overrides, validated; with `world_size`, also the checks that need it."""
    cfg = Config()
    if path is not None:
        from_dict(read_yaml(path), cfg)
    apply_overrides(cfg, overrides)
    validate(cfg)
    if world_size is not None:
        check_world(cfg, world_size)
    return cfg


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
