"""The numerics of a training step: precision and autocast, the optimizer and its groups, the LR schedule, EMA."""

from __future__ import annotations

import copy
import itertools
import math
import os
from contextlib import nullcontext

import torch
from torch import nn


def resolve_precision(requested: str, device: torch.device, env=os.environ) -> str:
    """`auto`: what accelerate asked for, else bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if requested != "auto":
        return requested
    accel = env.get("ACCELERATE_MIXED_PRECISION")
    if accel in ("bf16", "fp16"):
        return accel
    if accel == "no" or device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_for(precision: str, device: torch.device):
    """bf16 / fp16 autocast, or a no-op context for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16; a disabled scaler (a no-op, not an `if` in the loop) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS's fixed workspace: its deterministic mode (CUDA's documentation)


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """Fast: cuDNN picks the fastest convolution algorithms for our fixed shapes (a one-off search per
    shape). Deterministic (run.deterministic): only deterministic kernels (an op without one raises), no
    autotuner; the entry points set CUBLAS_WORKSPACE_CONFIG before CUDA starts."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def optimizer_impl(device: torch.device, precision: str) -> dict:
    """Which SGD kernel: fused on GPUs, except under fp16, where a step the GradScaler skips (an overflow,
    typically the first) leaves the fused kernel's momentum buffers uninitialised: NaN from then on.
    foreach (one kernel per group of tensors) everywhere else."""
    if device.type == "cuda" and precision != "fp16":
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True}


def make_optimizer(model: nn.Module, t, device: torch.device, precision: str) -> torch.optim.Optimizer:
    """SGD; BatchNorm weights and biases (all 1-d parameters) get no weight decay."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(
        groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, **optimizer_impl(device, precision)
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this run's kernel choice: load_state_dict would also restore
    the saving run's `fused` / `foreach` flags (a GPU's fused on CPU, or fused under fp16)."""
    impl = [{k: g[k] for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, impl):
        group.update(flags)


def apply_settings(optimizer: torch.optim.Optimizer, scheduler, t) -> None:
    """This run's momentum, weight decay and LR peak over a loaded checkpoint's (load_state_dict restores
    the saving run's): a resume with another train.lr follows this run's schedule from its step on. The LR
    schedule itself (epochs, shape) is this run's already: its function is not part of the saved state."""
    decay, no_decay = optimizer.param_groups
    decay["weight_decay"] = t.weight_decay
    scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(momentum=t.momentum, nesterov=t.nesterov, initial_lr=t.lr)
        group["lr"] = t.lr * factor(scheduler.last_epoch)  # as LambdaLR computes it
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def lr_factor(t, total_steps: int):
    """Multiplier of the peak LR at each step: constant, onecycle (linear up, linear down) or warmup + cosine."""
    warm = max(1, round(t.warmup * total_steps)) if t.warmup > 0 else 0

    def factor(step: int) -> float:
        if t.schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total_steps - warm)
        if t.schedule == "onecycle":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, t, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t, total_steps))


class EMA:
    """An exponential moving average of the weights and BatchNorm statistics; evaluation uses it.

    The update is two foreach kernels on device tensors (lerp for floating-point tensors, a copy for the
    integer batch counters), the count a Python int: no host sync per step.
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
    def update(self, model: nn.Module) -> None:
        if self.source is None or self.source[0] is not model:
            self.source = (model, self._tensors(model))
        (avg_f, avg_i), (cur_f, cur_i) = self.avg, self.source[1]
        if self.count == 0:  # the first update copies
            torch._foreach_copy_(avg_f, cur_f)
        else:
            torch._foreach_lerp_(avg_f, cur_f, 1.0 - self.decay)
        if avg_i:
            torch._foreach_copy_(avg_i, cur_i)
        self.count += 1

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "n_averaged": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.count = int(state["n_averaged"])  # a tensor in checkpoints of torch's AveragedModel


class NoEMA:
    """EMA switched off: evaluation uses the model itself."""

    def __init__(self, model: nn.Module):
        self.module = model

    def update(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


def make_ema(model: nn.Module, decay: float):
    return EMA(model, decay) if decay > 0 else NoEMA(model)
