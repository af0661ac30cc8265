"""Trainer: the state of one run and the loop that advances it, identical on 1 CPU or 64 GPUs."""
from __future__ import annotations

import copy
import itertools
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint
from .config import Config
from .data import CLASSES, TrainBatches, eval_shard, load_split, normalize, prepare
from .distributed import DistEnv, NoPreemption, all_reduce_sum, broadcast_buffers, rank0_decides
from .metrics import NullLogger, progress_bar
from .model import build_model

CLASS_KEYS = tuple(c.lower().replace("-", "_").replace("/", "_").replace(" ", "_") for c in CLASSES)


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
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                           **optimizer_impl(device, precision))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this run's kernel choice: load_state_dict would also restore
    the saving run's `fused` / `foreach` flags (a GPU's fused on CPU, or fused under fp16)."""
    impl = [{k: g[k] for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, impl):
        group.update(flags)


def compile_unavailable(device: torch.device, which=shutil.which, include_dir: str | None = None) -> str | None:
    """Why torch.compile cannot work here, or None: Inductor builds C/C++ code, which needs a compiler and
    the Python headers (a bare machine or container often has neither)."""
    names = ("cc", "gcc", "clang") if device.type == "cuda" else ("c++", "g++", "clang++")
    env_var = "CC" if device.type == "cuda" else "CXX"
    if not (os.environ.get(env_var) or any(which(n) for n in names)):
        return f"no C{'' if device.type == 'cuda' else '++'} compiler ({'/'.join(names)}) on PATH"
    include_dir = include_dir or sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include_dir, "Python.h")):
        return f"no Python headers ({include_dir}/Python.h)"
    return None


def configure_backends(device: torch.device) -> None:
    """cuDNN picks the fastest convolution algorithms for our fixed shapes (a one-off search per shape)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


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


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, resize, autocast=nullcontext(), tta_flip: bool = False):
    """Float logits of a batch of uint8 images (model in eval mode): normalize, resize, optional flip TTA."""
    x = normalize(images, resize)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast:
        out = model(x).float()
        if tta_flip:  # average the logits of the image and its mirror
            out = (out + model(x.flip(-1)).float()) / 2
    return out


@torch.no_grad()
def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, env: DistEnv, resize,
                   batch_size: int, autocast=nullcontext(), num_classes: int = 10, tta_flip: bool = False) -> dict:
    """Exact test metrics: each rank takes an unpadded shard; (loss sum, confusion matrix) is all-reduced once."""
    was_training = model.training
    model.eval()
    shard = eval_shard(len(labels), env.rank, env.world_size)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=images.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=images.device)
    for i in range(shard.start, shard.stop, batch_size):
        j = min(i + batch_size, shard.stop)
        out, y = predict(model, images[i:j], resize, autocast, tta_flip), labels[i:j]
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + out.argmax(1), minlength=num_classes ** 2).double()
    total = all_reduce_sum(torch.cat([loss_sum, confusion])).cpu()
    model.train(was_training)
    conf = total[1:].view(num_classes, num_classes).round().long()  # rows: true class, columns: predicted
    count = int(conf.sum())
    assert count == len(labels), f"evaluation counted {count} images, the split has {len(labels)}: shards overlap or miss"
    per_class = conf.diag().double() / conf.sum(1).clamp(min=1).double()
    result = {"test/loss": float(total[0]) / count, "test/acc": float(conf.diag().sum()) / count, "test/samples": count}
    result.update({f"test/acc/{k}": float(a) for k, a in zip(CLASS_KEYS, per_class)})
    result["confusion"] = conf.tolist()
    return result


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


def augment_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's augmentation stream. 100_003 (a prime above any rank count) keeps (seed, rank)
    pairs apart; a stream started later (a rank added by a resize, a reseed) also mixes in the step."""
    return seed * 100_003 + rank + 7919 * step


def rng_state(gen: torch.Generator) -> dict:
    """Every random stream of this rank, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    return {"augment": gen.get_state(), "augment_device": gen.device.type, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


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


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path | None = None, logger=NullLogger(),
                 preemption=None):
        self.cfg, self.env, self.run_dir, self.logger = cfg, env, run_dir, logger
        self.preemption = preemption or NoPreemption()
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        dev = env.device
        raw = prepare(cfg.data.root, cfg.data.mirror)
        train_x, train_y = load_split(raw, "train", cfg.data.train_subset)
        test_x, test_y = load_split(raw, "test", cfg.data.test_subset)
        self.test_x, self.test_y = test_x.to(dev), test_y.to(dev)
        t = cfg.train
        assert t.batch_size % env.world_size == 0, "the global batch must split evenly over the ranks"
        self.batches = TrainBatches(train_x.to(dev), train_y.to(dev), t.batch_size // env.world_size,
                                    env.rank, env.world_size, cfg.run.seed, cfg.data)
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(augment_seed(cfg.run.seed, env.rank))  # each rank augments differently
        self.model = build_model(cfg.model).to(dev)
        self.channels_last = dev.type == "cuda" and t.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = self.model
        if env.distributed:
            # gradient_as_bucket_view: gradients live in DDP's buckets, saving a copy per step
            self.ddp = DDP(self.model, device_ids=[dev] if dev.type == "cuda" else None,
                           gradient_as_bucket_view=True, bucket_cap_mb=cfg.dist.bucket_mb)
            if cfg.dist.grad_compression == "bf16":  # all-reduce bf16 copies of the gradients: half the bytes
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
                self.ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        self.forward = self.ddp
        if t.compile:
            missing = compile_unavailable(dev)
            if missing is None:
                self.forward = torch.compile(self.ddp)
            elif env.is_main:
                print(f"warning: train.compile=true needs a compiler toolchain, but there is {missing}: training "
                      "without torch.compile (install gcc, g++ and python3-dev, or set train.compile=false)",
                      file=sys.stderr, flush=True)
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else NoEMA(self.model)
        self.precision = resolve_precision(t.precision, dev)
        self.autocast = autocast_for(self.precision, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.precision == "fp16")
        self.optimizer = make_optimizer(self.model, t, dev, self.precision)
        self.total_steps = t.epochs * self.batches.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(t, self.total_steps))
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        # progress: the epoch and the step within it to run next, and the global step count
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        # train metrics: (loss sum, correct) accumulate on the device, summed over ranks once per log interval
        self.interval = torch.zeros(2, dtype=torch.float64, device=dev)
        self.interval_steps = 0
        self.epoch_sums = [0.0, 0.0, 0]  # loss sum, correct, images: already reduced over ranks
        self.epoch_time = self.interval_time = 0.0  # seconds of training (excluding evaluation and saving)
        self.clock = None
        self.seconds = {"train": 0.0, "eval": 0.0, "save": 0.0}  # this process's time split
        self.last_save_s, self.last_save_end = 0.0, time.perf_counter()  # for the checkpoint overhead rule
        self.wandb_id = None
        self.history: list[dict] = []

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            out = self.forward(x)
            loss = self.loss_fn(out, y)
        # under DDP the gradients are views into its buckets (gradient_as_bucket_view): zero them in place,
        # or autograd allocates new ones each step and DDP copies them back into the buckets
        self.optimizer.zero_grad(set_to_none=not self.env.distributed)
        self.scaler.scale(loss).backward()  # DDP all-reduces gradients bucket by bucket during backward
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.ema.update(self.model)
        with torch.no_grad():  # stays on the device: no host sync per step
            self.interval += torch.stack([loss.detach().double() * len(y), (out.argmax(1) == y).sum().double()])
        self.interval_steps += 1

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to the end ("done") or until a signal ("preempted"); checkpoints as configured."""
        c, spe = self.cfg, self.batches.steps_per_epoch
        every_ckpt = c.checkpoint.every_steps
        while self.epoch < c.train.epochs:
            bar = progress_bar(self.env.is_main, c.log.progress, spe, f"epoch {self.epoch + 1}/{c.train.epochs}",
                               self.step_in_epoch)
            self.tick(count=False)  # the previous epoch's evaluation and checkpoint are not training time
            for x, y in self.batches.epoch(self.epoch, self.gen, start_step=self.step_in_epoch):
                self.train_step(x, y)
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update()
                if self.global_step % c.log.every_steps == 0 or self.step_in_epoch == spe:
                    self.log_interval(bar)
                if self.step_in_epoch < spe and self.preemption.agreed():
                    bar.close()
                    return self.stop()
                if every_ckpt and self.global_step % every_ckpt == 0 and self.step_in_epoch < spe:
                    self.tick()
                    self.save()
                    self.tick(count=False)
            bar.close()
            saved = self.end_epoch()
            if self.preemption.drain() and self.epoch < c.train.epochs:
                return self.stop(saved=saved)
        return "done"

    def tick(self, count: bool = True) -> None:
        """Add the time since the last tick to the interval's training time (unless `count` is False)."""
        now = time.perf_counter()
        if count and self.clock is not None:
            self.interval_time += now - self.clock
        self.clock = now

    def log_interval(self, bar) -> None:
        """Sum the interval's metrics over ranks (the one collective and host sync of the interval) and log."""
        loss_sum, correct = all_reduce_sum(self.interval).tolist()
        self.tick()  # after the sync: the device has finished the interval's work
        n = self.interval_steps * self.cfg.train.batch_size
        self.epoch_sums = [self.epoch_sums[0] + loss_sum, self.epoch_sums[1] + correct, self.epoch_sums[2] + n]
        self.interval.zero_()
        self.interval_steps = 0
        lr = self.scheduler.get_last_lr()[0]
        bar.set_postfix_str(f"loss {loss_sum / n:.4f} lr {lr:.4g}")
        images_per_s = n / self.interval_time if self.interval_time > 0 else 0.0
        self.epoch_time += self.interval_time
        self.seconds["train"] += self.interval_time
        self.interval_time = 0.0
        record = {"kind": "step", "epoch": self.epoch, "step": self.global_step,
                  "train/loss": loss_sum / n, "train/acc": correct / n, "lr": lr, "images_per_s": images_per_s}
        if self.env.device.type == "cuda":
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.logger.log(record)

    def end_epoch(self) -> bool:
        """Evaluate, log the epoch, and save when the checkpoint cadence says so; True if it saved."""
        loss_sum, correct, n = self.epoch_sums
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step, "world_size": self.env.world_size,
                  "train/loss": loss_sum / n, "train/acc": correct / n, "lr": self.scheduler.get_last_lr()[0],
                  "images_per_s": n / self.epoch_time}
        start = time.perf_counter()
        result = self.evaluate()
        self.seconds["eval"] += time.perf_counter() - start
        record.update({k: v for k, v in result.items() if k != "confusion"})
        self.history.append({"epoch": self.epoch, "confusion": result["confusion"]})
        self.logger.log(record)
        self.epoch += 1
        self.step_in_epoch, self.epoch_sums, self.epoch_time = 0, [0.0, 0.0, 0], 0.0
        if self.epoch_save_due():
            self.save()
            return True
        return False

    def epoch_save_due(self) -> bool:
        """The last epoch always saves; others every `checkpoint.every_epochs`, unless saving would take more than
        `checkpoint.max_overhead` of the time since the previous save (fast GPUs, tiny epochs). Rank 0's clock
        decides for all: every rank takes part in a save."""
        c = self.cfg.checkpoint
        if self.epoch >= self.cfg.train.epochs:
            return True
        if self.epoch % c.every_epochs:
            return False
        since = time.perf_counter() - self.last_save_end
        return rank0_decides(self.last_save_s <= c.max_overhead * (since + self.last_save_s), self.env.device)

    def evaluate(self) -> dict:
        broadcast_buffers(self.ema.module)  # rank 0's BatchNorm statistics, the ones the checkpoint holds
        return evaluate_model(self.ema.module, self.test_x, self.test_y, self.env, self.cfg.data.resize,
                              self.cfg.data.eval_batch_size, self.autocast, self.cfg.model.num_classes,
                              self.cfg.train.tta_flip)

    def stop(self, saved: bool = False) -> str:
        self.preemption.drain()
        if not saved:
            self.save()
        if self.env.is_main:
            print(f"preempted: checkpoint saved at step {self.global_step}; "
                  "the same command resumes from it", flush=True)
        return "preempted"

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (all ranks take part: it gathers RNG states)."""
        loss_sum, correct = all_reduce_sum(self.interval.clone()).tolist()  # partial interval, summed over ranks
        rngs = [None] * self.env.world_size
        if self.env.distributed:
            dist.all_gather_object(rngs, rng_state(self.gen))
        else:
            rngs[0] = rng_state(self.gen)
        return {
            "model": self.model.state_dict(),  # the unwrapped module: no "module." prefixes
            "ema": self.ema.state_dict(),  # None without EMA; evaluation uses these weights when present
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                         "sampler_seed": self.batches.sampler.seed, "sampler_epoch": self.epoch,
                         "sampler_position": self.step_in_epoch * self.cfg.train.batch_size,
                         "interval": [loss_sum, correct], "interval_steps": self.interval_steps,
                         "epoch_sums": list(self.epoch_sums), "epoch_time": self.epoch_time},
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "world_size": self.env.world_size,
            "wandb_id": self.wandb_id,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        saved_model = state["config"]["model"]
        if saved_model != self.cfg.to_dict()["model"]:
            raise checkpoint.CheckpointError(f"checkpoint model config {saved_model} differs from this run's "
                                             f"{self.cfg.to_dict()['model']}: refusing to load it")
        self.model.load_state_dict(state["model"])
        if state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the saving run had no GradScaler (bf16, fp32): fp16 starts a fresh one
            self.scaler.load_state_dict(state["scaler"])
        p = state["progress"]
        self.epoch, self.step_in_epoch, self.global_step = p["epoch"], p["step_in_epoch"], p["global_step"]
        self.batches.sampler.seed = p["sampler_seed"]  # the run's data order, even if run.seed was changed since
        # progress counts global batches and the interval sums are global: both carry over to another world size
        self.interval.zero_()
        if self.env.is_main:  # the partial interval was summed over ranks: rank 0 carries it alone
            self.interval += torch.tensor(p["interval"], dtype=torch.float64, device=self.interval.device)
        self.interval_steps = p["interval_steps"]
        self.epoch_sums, self.epoch_time = list(p["epoch_sums"]), p["epoch_time"]
        rngs = state["rng"]
        restored = self.env.rank < len(rngs) and set_rng_state(rngs[self.env.rank], self.gen)
        if not restored:  # a new rank after a resize, or a checkpoint from another kind of device: a fresh stream
            self.gen.manual_seed(augment_seed(self.cfg.run.seed, self.env.rank, self.global_step))
            saved_on = rngs[0].get("augment_device", "cpu")
            if self.env.is_main and saved_on != self.gen.device.type:
                print(f"note: the checkpoint's augmentation random streams were saved on {saved_on} and cannot be "
                      f"restored on {self.gen.device.type}: reseeded from run.seed and step {self.global_step} (the "
                      "run goes on, not bit-identical to an uninterrupted one)", flush=True)
        self.wandb_id = state.get("wandb_id")
        self.history = list(state.get("history", []))

    def save(self) -> None:
        start = time.perf_counter()
        state = self.state_dict()  # collective: every rank calls save() at the same step
        if self.env.is_main and self.run_dir is not None:
            checkpoint.save(state, self.run_dir / "checkpoints", self.global_step, self.cfg.checkpoint.keep)
        self.last_save_end = time.perf_counter()
        self.last_save_s = self.last_save_end - start
        self.seconds["save"] += self.last_save_s
