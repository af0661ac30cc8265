"""The training step: eager, or captured once as a CUDA graph and replayed (`train.cuda_graphs`).

At 28x28 a GPU step is a few milliseconds of small kernels, and the host cannot launch them as fast as the GPU
runs them: the step is launch-bound. A CUDA graph records every kernel of one step once (forward, backward with
DDP's all-reduce, the optimizer, the EMA, the metric sums) and replays them with one launch. What a replay reads
must live in device tensors that stay put: the batch (copied into static buffers), the learning rate (a device
tensor the fused SGD reads), the EMA's weight; what is Python in the step (the step count, the EMA's count, the
meter's tallies) runs outside the graph, after each replay.

Before training, one captured and one eager step run from the same full state (weights, momentum, BatchNorm
statistics, EMA, metric sums) on the same batch, and must agree on the loss, the gradients and the update;
then the state is put back. A capture that fails or disagrees falls back to eager (`auto`) or stops (`on`).
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .amp import LossScaler, NoScaler
from .errors import ConfigError, first_line
from .graphs import CaptureError, CudaGraphs
from .metrics import TrainMeter
from .optim import EMA, NoEMA, Schedule

WARMUP_STEPS = 3  # eager steps before a capture: cuDNN's algorithm search, momentum buffers, the allocator
WARMUP_STEPS_DDP = 11  # DDP needs at least 11 eager iterations before a capture (PyTorch's CUDA graph notes)
# how far a captured step may be from an eager one (relative L2 of the loss, gradients, update, statistics):
# replays run the same kernels on the same inputs, so they agree closely; a graph that froze the LR, lost the
# momentum or replays a stale input is off by order 1
TOLERANCE = {"bf16": 2e-2, "fp32": 1e-3}


def plan(setting: str, graphs: bool, precision: str, world_size: int, backend: str | None, cfg) -> str | None:
    """Why the step stays eager under `train.cuda_graphs=setting`, or None: capture it. `graphs`: whether this
    device has CUDA graphs. Raises UsageError for `on` where capture cannot work (exit 2 before the run)."""
    if setting == "off":
        return "train.cuda_graphs=off"
    reasons = [
        (not graphs, "not on a GPU"),
        (precision == "fp16", "fp16: its loss scaler decides on the host whether each step applies"),
        (world_size > 1 and backend != "nccl", f"{backend} collectives pass through the host"),
        (
            world_size > 1 and cfg.dist.grad_compression != "none",
            "the bf16 compression hook runs Python per bucket",
        ),
    ]
    why = next((text for bad, text in reasons if bad), None)
    if why and setting == "on":
        raise ConfigError(f"train.cuda_graphs=on cannot capture this run ({why}): use auto or off")
    if why is None and world_size > 1 and setting == "auto":
        why = "several GPUs: capture under DDP is not yet verified on 2+ GPUs (train.cuda_graphs=on tries it)"
    return why


@dataclass
class Parts:
    """What a step works with, built by the Trainer."""

    model: nn.Module  # the plain module: its parameters, buffers and the EMA's source
    train_model: nn.Module  # what the forward pass calls: the DDP wrapper or the model
    ddp: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    amp: LossScaler | NoScaler
    ema: EMA | NoEMA
    meter: TrainMeter
    loss_fn: nn.Module
    autocast: object
    memory_format: torch.memory_format
    accum_steps: int


def forward_backward(p: Parts, x: torch.Tensor, y: torch.Tensor, clock=None) -> None:
    """Forward and backward over `accum_steps` micro-batches, their sums into the meter's step sums. Gradients are
    all-reduced once, with the last micro-batch (DDP's no_sync on the others). `clock`: time each forward pass
    (the part of a step no rank waits for another in) for the straggler figures; eager steps only."""
    n = p.accum_steps
    for i, (xm, ym) in enumerate(zip(x.chunk(n), y.chunk(n))):
        with p.ddp.no_sync() if p.ddp and i < n - 1 else nullcontext():
            start = clock.mark() if clock else None
            with p.autocast:
                out = p.train_model(xm.contiguous(memory_format=p.memory_format))
                loss = p.loss_fn(out, ym)
            if clock:
                p.meter.busy_since(start)
            # each micro-batch's mean loss weighs 1/n: the summed gradients are the global batch's mean
            p.amp.backward(loss / n)  # DDP all-reduces bucket by bucket during the last one
        p.meter.add(loss, out, ym)


class EagerStep:
    """One optimizer step, launched op by op from Python."""

    captured = False

    def __init__(self, parts: Parts):
        self.p = parts

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        p = self.p
        p.schedule.set(step)
        p.amp.begin()
        # zeroed in place, not set to None: under DDP the gradients are views into its buckets
        # (gradient_as_bucket_view), which autograd would otherwise replace each step and DDP copy back; and a
        # captured step's graph writes these very tensors
        p.optimizer.zero_grad(set_to_none=False)
        forward_backward(p, x, y, p.meter.device_clock)
        trained = p.amp.step(p.optimizer)  # False: fp16's gradients overflowed, the step was skipped
        if trained:  # a skipped step leaves no trace (the loss scaler put the BatchNorm statistics back)
            p.ema.update(p.model)
        p.meter.count_step(trained)


class CapturedStep:
    """The step as one graph: static input buffers filled by the data path, then a replay."""

    captured = True

    def __init__(self, parts: Parts, eager: EagerStep, graphs=None, stream=None):
        self.p, self.eager, self.graphs = parts, eager, graphs or CudaGraphs()
        # DDP was built on this stream (see Trainer): the warm-up and the capture run on it too
        self.stream = stream or self.graphs.stream()
        self.graph = self.x = self.y = None
        for group in parts.optimizer.param_groups:
            assert isinstance(group["lr"], torch.Tensor), "a captured step reads its LR from a device tensor"

    def body(self) -> None:
        """What the graph holds: zero the gradients, forward and backward, the optimizer, the EMA, the sums."""
        p = self.p
        p.optimizer.zero_grad(set_to_none=False)
        forward_backward(p, self.x, self.y)
        p.optimizer.step()
        p.ema.apply(p.model)
        p.meter.fold()

    def capture(self, batches, step: int) -> None:
        """Warm up on real batches (eager steps that run cuDNN's search and make the momentum buffers), then
        record the graph. The caller keeps the state from before and puts it back (`State`)."""
        p, warmup = self.p, WARMUP_STEPS_DDP if self.p.ddp is not None else WARMUP_STEPS
        x0, y0 = next(batches)
        self.x, self.y = torch.empty_like(x0, memory_format=p.memory_format), torch.empty_like(y0)
        with self.graphs.on(self.stream):
            for x, y in itertools.chain([(x0, y0)], itertools.islice(batches, warmup - 1)):
                self.x.copy_(x), self.y.copy_(y)
                p.schedule.set(step)
                self.body()
                p.ema.advance()  # past the first update (a copy): the graph holds the lerp
        self.graphs.join(self.stream)
        self.graph = self.graphs.capture(self.body, self.stream)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        p = self.p
        # a fresh run's first step runs eagerly: its EMA update copies, the graph's lerps
        if getattr(p.ema, "count", 1) == 0:
            return self.eager(x, y, step)
        start = p.meter.device_clock.mark()
        p.schedule.set(step)
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        p.meter.busy_since(start)  # the whole step: a replay cannot be split (world size 1 has no straggler)
        p.ema.advance()
        p.meter.tally(True)


def momentum_buffers(p: Parts) -> list[torch.Tensor]:
    """SGD's momentum buffers, once its first step made them (read without adding entries to its state)."""
    found = [p.optimizer.state.get(q, {}).get("momentum_buffer") for q in p.model.parameters()]
    return [m for m in found if m is not None]


class State:
    """Every tensor a step reads or writes, copied, and the host counters: put back with `restore()`."""

    def __init__(self, p: Parts):
        self.p = p
        self.momentum = momentum_buffers(p)  # none before a run's first step
        self.tensors = self.live()
        self.saved = [t.clone() for t in self.tensors]
        self.counts = (p.meter.steps, p.meter.trained, p.ema.count)

    def live(self) -> list[torch.Tensor]:
        p = self.p
        out = [t.detach() for t in itertools.chain(p.model.parameters(), p.model.buffers())]
        out += self.momentum
        if hasattr(p.ema, "avg"):
            out += [*p.ema.avg[0], *p.ema.avg[1]]
        return out + [p.meter.sums, p.meter.step_sums]

    def restore(self) -> None:
        """Put everything back. Momentum buffers made since (by a warm-up) are zeroed: SGD's first step sets the
        buffer to the gradient, which is what a step from a zero buffer does (no dampening)."""
        p = self.p
        if not self.momentum:
            torch._foreach_zero_(momentum_buffers(p))
        torch._foreach_copy_(self.tensors, self.saved)
        p.meter.steps, p.meter.trained, p.ema.count = self.counts


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return (
        torch.cat([t.double().flatten() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)
    )


def outcome(p: Parts, run) -> dict[str, torch.Tensor]:
    """Run one step (`run()`) and return what it did: the loss and accuracy sums, the gradients, the change of
    the weights, of the BatchNorm statistics and of the EMA (each flattened, float64)."""
    groups = {
        "update of the weights": [q.detach() for q in p.model.parameters()],
        "BatchNorm statistics": [b for b in p.model.buffers() if b.is_floating_point()],
        "EMA": list(p.ema.avg[0]) if hasattr(p.ema, "avg") else [],
    }
    before = {name: [t.clone() for t in ts] for name, ts in groups.items()}
    sums = p.meter.sums.clone()
    run()
    changes = {name: _flat([a - b for a, b in zip(ts, before[name])]) for name, ts in groups.items()}
    return {
        "loss and accuracy": (p.meter.sums - sums).double(),
        "gradients": _flat([q.grad for q in p.model.parameters()]),
        **changes,
    }


def disagreement(eager: dict, captured: dict, tolerance: float) -> str | None:
    """The first figure on which the captured step is further than `tolerance` (relative L2) from the eager one."""
    for name, e in eager.items():
        c = captured[name]
        err = float((c - e).norm() / e.norm().clamp(min=1e-12)) if e.numel() else 0.0
        if not err <= tolerance:  # also NaN
            return f"{name}: relative difference {err:.3g} (tolerance {tolerance:g})"
    return None


def capture(
    parts: Parts, eager: EagerStep, batches, step: int, precision: str, graphs=None, stream=None
) -> CapturedStep:
    """A CapturedStep checked against the eager step from the same state on the same batch; the state is put
    back as it was. Raises CaptureError (one line) when the capture fails or the two disagree."""
    state = State(parts)
    batches = iter(batches)
    x, y = next(batches)
    try:
        step_fn = CapturedStep(parts, eager, graphs, stream)
        step_fn.capture(itertools.chain([(x, y)], batches), step)
        # compared as a later step (a fresh run's first step, whose EMA update copies, runs eagerly anyway)
        state.restore()
        parts.ema.count = max(1, parts.ema.count)
        e = outcome(parts, lambda: eager(x, y, step))
        state.restore()
        parts.ema.count = max(1, parts.ema.count)
        c = outcome(parts, lambda: step_fn(x, y, step))
    except CaptureError:
        raise
    except Exception as err:  # noqa: BLE001 - any capture failure: one line, and the caller falls back or stops
        state.restore()
        raise CaptureError(f"capturing the step failed ({type(err).__name__}: {first_line(err)})") from None
    state.restore()
    why = disagreement(e, c, TOLERANCE.get(precision, TOLERANCE["bf16"]))
    if why:
        raise CaptureError(f"the captured step disagrees with the eager one on the same batch: {why}")
    return step_fn
