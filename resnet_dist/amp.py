"""Mixed precision: which (bf16, fp16 or fp32), its autocast, and fp16's loss scaling with every skipped step
accounted for and undone."""

from __future__ import annotations

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
