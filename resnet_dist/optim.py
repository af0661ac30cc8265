"""The optimizer and its groups, the learning-rate schedule, and the EMA of the weights."""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn

from .config import TrainConfig


def optimizer_impl(precision: str) -> dict:
    """Which SGD kernel: fused (one pass over each parameter, its gradient and momentum, allocating nothing),
    on GPUs and on the CPU alike, except under fp16, where a step the GradScaler skips (an overflow, typically
    the first) leaves the fused kernel's momentum buffers uninitialised: NaN from then on; foreach (one kernel
    per group of tensors) there. On the CPU, foreach is no cheaper than a loop: its out-of-place steps (weight
    decay, Nesterov) allocate a copy of every gradient at once, fresh pages each step (for ResNet-18 on one core
    ~25 ms a step against the fused kernel's ~4 ms)."""
    if precision != "fp16":
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True}


def make_optimizer(
    model: nn.Module, train: TrainConfig, device: torch.device, precision: str, lr_tensor: bool = False
) -> torch.optim.Optimizer:
    """SGD; BatchNorm weights and biases (all 1-d parameters) get no weight decay. `lr_tensor`: the LR lives in
    one device tensor shared by both groups, which a captured step reads at each replay (the fused kernel reads
    it on the device; the foreach one would read it on the host, a sync: so it needs the fused SGD)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    impl = {"fused": True, "foreach": None} if lr_tensor else optimizer_impl(precision)
    lr = torch.tensor(train.lr, device=device) if lr_tensor else train.lr
    return torch.optim.SGD(groups, lr=lr, momentum=train.momentum, nesterov=train.nesterov, **impl)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this run's kernel choice: load_state_dict would also restore
    the saving run's `fused` / `foreach` flags (a GPU's fused on CPU, or fused under fp16)."""
    impl = [{k: g[k] for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, impl):
        group.update(flags)


def apply_settings(optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
    """This run's momentum and weight decay over a loaded checkpoint's (load_state_dict restores the saving
    run's). The learning rate needs nothing: `Schedule` sets it from this run's config at every step."""
    decay, _ = optimizer.param_groups
    decay["weight_decay"] = train.weight_decay
    for group in optimizer.param_groups:
        group.update(momentum=train.momentum, nesterov=train.nesterov)


def lr_factor(train: TrainConfig, total_steps: int):
    """Multiplier of the peak LR at each step: constant, onecycle (linear up, linear down) or warmup + cosine."""
    warm = max(1, round(train.warmup * total_steps)) if train.warmup > 0 else 0

    def factor(step: int) -> float:
        if train.schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total_steps - warm)
        if train.schedule == "onecycle":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    return factor


class Schedule:
    """The learning rate of each step, a pure function of the global step: `train.lr` x lr_factor(step).

    `set(step)` writes it into the optimizer's groups before the step (in place when the LR is a device tensor,
    which a captured step reads). No state of its own, so nothing to save, and a resume with another train.lr
    or schedule follows this run's from the checkpoint's step. Unlike torch's LRScheduler it never asks
    whether the optimizer stepped: a step that fp16's loss scaler skips still consumed its batch and counts.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
        self.optimizer, self.peak, self.factor = optimizer, train.lr, lr_factor(train, total_steps)

    def at(self, step: int) -> float:
        return self.peak * self.factor(step)

    def set(self, step: int) -> float:
        lr = self.at(step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # a kernel on the device: the host does not wait for it
            else:
                group["lr"] = lr
        return lr


class EMA:
    """An exponential moving average of the weights and BatchNorm statistics; evaluation uses it.

    `apply()` is the device work, two foreach kernels (a lerp for floating-point tensors, a copy for the integer
    batch counters; the first update copies): no host sync, and a captured step replays it (the decay is a
    Python number the graph keeps). `advance()` is the host's part, the count.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.count = decay, 0
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.avg = self._tensors(self.module)
        self.source: tuple[nn.Module, tuple[list, list]] | None = None  # the model and its tensor lists

    @staticmethod
    def _tensors(module: nn.Module) -> tuple[list, list]:
        """(floating-point, integer) parameters and buffers, in module order."""
        all_ = [t.detach() for t in itertools.chain(module.parameters(), module.buffers())]
        return [t for t in all_ if t.is_floating_point()], [t for t in all_ if not t.is_floating_point()]

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        if self.source is None or self.source[0] is not model:
            self.source = (model, self._tensors(model))
        (avg_f, avg_i), (cur_f, cur_i) = self.avg, self.source[1]
        if self.count == 0:  # the first update copies
            torch._foreach_copy_(avg_f, cur_f)
        else:
            torch._foreach_lerp_(avg_f, cur_f, 1.0 - self.decay)
        if avg_i:
            torch._foreach_copy_(avg_i, cur_i)

    def advance(self) -> None:
        self.count += 1

    def update(self, model: nn.Module) -> None:
        self.apply(model)
        self.advance()

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "n_averaged": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.count = state["n_averaged"]


class NoEMA:
    """EMA switched off: evaluation uses the model itself."""

    count = 1  # never a first update to copy

    def __init__(self, model: nn.Module):
        self.module = model

    def apply(self, model: nn.Module) -> None:
        pass

    def advance(self) -> None:
        pass

    def update(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


def make_ema(model: nn.Module, decay: float):
    return EMA(model, decay) if decay > 0 else NoEMA(model)
