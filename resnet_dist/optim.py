"""The numerics of a training step: precision and autocast, the optimizer and its groups, the LR schedule, EMA."""

from __future__ import annotations

import copy
import ctypes
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
    # without including_emulation=False, V100 and T4 (compute capability 7.x) answer True: they run bf16 by
    # emulation, without tensor cores, far slower than their fp16
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast_for(precision: str, device: torch.device, cache: bool = True):
    """bf16 / fp16 autocast, or a no-op context for fp32. `cache=False`: no cast cache (a CUDA graph capture)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache) if dtype else nullcontext()


CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS's fixed workspace: its deterministic mode (CUDA's documentation)


# glibc's mallopt parameters (malloc.h), and its upper limit for the mmap threshold on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX = -1, -3, 32 * 2**20


def reuse_freed_memory() -> bool:
    """Keep the memory a step frees for the next step, where the C library is glibc (True if it took the
    settings; elsewhere nothing changes). By default glibc returns freed blocks of over 128 KiB to the kernel
    (each is its own mmap) and trims the top of its heap, so every CPU step takes its activations from fresh,
    zero-filled pages: for ResNet-18 at 128 images a rank page-faults ~10-20 thousand times a step (40-90 MB).
    Blocks up to 32 MiB from the heap and no trimming: the process keeps the peak its steps reach anyway."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc's malloc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) & bool(mallopt(M_TRIM_THRESHOLD, -1))


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """Fast: cuDNN picks the fastest convolution algorithms for our fixed shapes (a one-off search per
    shape); on the CPU, the memory a step frees is kept for the next (`reuse_freed_memory`). Deterministic
    (run.deterministic): only deterministic kernels (an op without one raises), no autotuner; the entry
    points set CUBLAS_WORKSPACE_CONFIG before CUDA starts."""
    if device.type == "cpu":
        reuse_freed_memory()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def optimizer_impl(device: torch.device, precision: str) -> dict:
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
    model: nn.Module, t, device: torch.device, precision: str, lr_tensor: bool = False
) -> torch.optim.Optimizer:
    """SGD; BatchNorm weights and biases (all 1-d parameters) get no weight decay. `lr_tensor`: the LR lives in
    one device tensor shared by both groups, which a captured step reads at each replay (the fused kernel reads
    it on the device; the foreach one would read it on the host, a sync: so it needs the fused SGD)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = {"fused": True, "foreach": None} if lr_tensor else optimizer_impl(device, precision)
    lr = torch.tensor(t.lr, device=device) if lr_tensor else t.lr
    return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, nesterov=t.nesterov, **impl)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this run's kernel choice: load_state_dict would also restore
    the saving run's `fused` / `foreach` flags (a GPU's fused on CPU, or fused under fp16)."""
    impl = [{k: g[k] for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, impl):
        group.update(flags)


def apply_settings(optimizer: torch.optim.Optimizer, t) -> None:
    """This run's momentum and weight decay over a loaded checkpoint's (load_state_dict restores the saving
    run's). The learning rate needs nothing: `Schedule` sets it from this run's config at every step."""
    decay, _ = optimizer.param_groups
    decay["weight_decay"] = t.weight_decay
    for group in optimizer.param_groups:
        group.update(momentum=t.momentum, nesterov=t.nesterov)


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


class Schedule:
    """The learning rate of each step, a pure function of the global step: `train.lr` x lr_factor(step).

    `set(step)` writes it into the optimizer's groups before the step (in place when the LR is a device tensor,
    which a captured step reads). No state of its own, so nothing to save, and a resume with another train.lr
    or schedule follows this run's from the checkpoint's step. Unlike torch's LRScheduler it never asks
    whether the optimizer stepped: a step that fp16's loss scaler skips still consumed its batch and counts.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, t, total_steps: int):
        self.optimizer, self.peak, self.factor = optimizer, t.lr, lr_factor(t, total_steps)

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


# GradScaler doubles the loss scale after this many steps without an overflow. torch's default (2000) is
# longer than the short recipes here (configs/fast.yaml has 1,404 steps): one early overflow would then keep
# the scale halved, and small gradients nearer to fp16's underflow, for the rest of the run. At 100 the scale
# recovers within a few hundred steps; each try that overflows costs one skipped step, 1% at most.
AMP_GROWTH_INTERVAL = 100
MAX_SKIPS_IN_A_ROW = 24


class LossScaler:
    """fp16's dynamic loss scaling (torch's GradScaler), with every skipped step accounted for and undone.

    GradScaler protects the weights: a step whose gradients overflowed fp16 is skipped. But the forward pass
    already moved the BatchNorm running statistics, which a pass that overflowed fills with inf or NaN (the
    model's, then the EMA's through its update: evaluation and every later checkpoint are then garbage). So
    `begin()` keeps a copy of the buffers and a skipped step puts them back: a skipped step leaves no trace
    but its count. `skipped` counts the open log interval, `skipped_total` the run (checkpoints carry it).
    """

    enabled = True

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        init_scale: float = 2.0**16,
        growth_interval: int = AMP_GROWTH_INTERVAL,
    ):
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=init_scale, growth_interval=growth_interval
        )
        self.buffers = list(model.buffers())  # BatchNorm's running statistics and batch counters
        self.saved = [b.clone() for b in self.buffers]
        self.skipped = self.skipped_total = self.in_a_row = 0

    def begin(self) -> None:
        torch._foreach_copy_(self.saved, self.buffers)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step, unless the gradients overflowed; True if it ran."""
        self.scaler.unscale_(optimizer)
        # the host read GradScaler.step makes anyway to decide (it reads the same flags again, at no cost)
        overflow = any(bool(f.item()) for f in self.scaler._found_inf_per_device(optimizer).values())
        self.scaler.step(optimizer)
        self.scaler.update()
        if overflow:
            torch._foreach_copy_(self.buffers, self.saved)
            self.skipped += 1
            self.skipped_total += 1
        self.in_a_row = self.in_a_row + 1 if overflow else 0
        return not overflow

    def hopeless(self) -> str | None:
        """Why fp16 cannot go on, or None. Each overflow halves the scale: after MAX_SKIPS_IN_A_ROW of them (a
        scale of 2^-8 from 2^16) the forward pass or the gradients exceed fp16's range for good; a few
        skipped steps in a row are normal at the start, while the scale settles."""
        if self.in_a_row < MAX_SKIPS_IN_A_ROW:
            return None
        return (
            f"fp16 overflowed in each of the last {self.in_a_row} steps (loss scale {self.scaler.get_scale():g}): "
            "the activations or gradients exceed fp16's range; train in bf16 if the GPU has it, else fp32"
        )

    def interval_record(self) -> dict:
        """amp/scale and amp/skipped of the log interval that ends now (the skip decisions are the same on every
        rank: they read the all-reduced gradients)."""
        record = {"amp/scale": self.scaler.get_scale(), "amp/skipped": self.skipped}
        self.skipped = 0
        return record

    def summary(self, steps: int) -> str:
        return f"; fp16: {self.skipped_total} of {steps} steps skipped (overflow), loss scale {self.scaler.get_scale():g}"

    def state_dict(self) -> dict:
        return {
            "scaler": self.scaler.state_dict(),
            "skipped": self.skipped_total,
            "interval_skipped": self.skipped,
            "in_a_row": self.in_a_row,
        }

    def load_state_dict(self, state: dict | None) -> None:
        if state:  # None when the saving run did not train in fp16: this run's scaler starts afresh
            self.scaler.load_state_dict(state["scaler"])
            self.skipped_total, self.skipped, self.in_a_row = (
                state["skipped"],
                state["interval_skipped"],
                state["in_a_row"],
            )


class NoScaler:
    """bf16 and fp32 need no loss scaling: every step runs (a no-op object, not an `if` in the loop)."""

    enabled = False

    def begin(self) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        optimizer.step()
        return True

    def interval_record(self) -> dict:
        return {}

    def hopeless(self) -> None:
        return None

    def summary(self, steps: int) -> str:
        return ""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


def loss_scaler(precision: str, model: nn.Module, device: torch.device):
    return LossScaler(model, device) if precision == "fp16" else NoScaler()


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
