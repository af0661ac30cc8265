"""Trainer: the state of one run and the loop that advances it, identical on 1 CPU or 64 GPUs.

Everything it works with is built by the entry point and passed in (the data on the device, the loggers,
the preemption handler): the Trainer never reads a file, installs a signal handler or creates a process
group, so `fit()` runs in a test on a few synthetic tensors.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint
from .config import Config
from .data import Splits, TrainBatches, augment_seed
from .distributed import DistEnv, NoPreemption, Preemption, broadcast_buffers, rank0_decides
from .evaluate import Evaluator
from .metrics import EpochMedia, NullLogger, TrainMeter, progress_bar
from .model import build_model, compiled, memory_format
from .optim import (
    autocast_for,
    grad_scaler,
    load_optimizer_state,
    make_ema,
    make_optimizer,
    make_scheduler,
    resolve_precision,
)


class Outcome(enum.Enum):
    DONE = "done"  # trained to the last epoch
    PREEMPTED = "preempted"  # stopped by a signal after saving a checkpoint: the same command resumes


class Trainer:
    # components
    cfg: Config
    env: DistEnv
    model: nn.Module  # the plain module: what checkpoints hold and `evaluate` rebuilds
    ddp: DDP | None  # the model under DDP; None in a single process
    train_model: nn.Module  # what a step calls: the DDP wrapper or the model, compiled or not
    # progress: the epoch and the step within it to run next, and the global step count
    epoch: int
    step_in_epoch: int
    global_step: int
    # metrics
    meter: TrainMeter
    seconds: dict[
        str, float
    ]  # this process's evaluation and checkpoint time (the meter has the training time)
    # run bookkeeping
    history: list[dict]  # one confusion matrix per epoch (plots.py draws the last)
    meta: dict  # saved with every checkpoint as it is (the W&B run id)

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        data: Splits,
        run_dir: Path | None = None,
        logger=None,
        preemption: Preemption | None = None,
        meta: dict | None = None,
    ):
        self.cfg, self.env, self.data, self.run_dir = cfg, env, data, run_dir
        self.logger = logger or NullLogger()
        self.preemption = preemption or NoPreemption()
        t, dev = cfg.train, env.device
        torch.manual_seed(
            cfg.run.seed
        )  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.batches = TrainBatches(
            data.train_x,
            data.train_y,
            t.batch_size // env.world_size,
            env.rank,
            env.world_size,
            cfg.run.seed,
            cfg.data,
        )
        self.gen = torch.Generator(device=dev).manual_seed(augment_seed(cfg.run.seed, env.rank))
        self.memory_format = memory_format(dev, t.channels_last)
        self.model = build_model(cfg.model).to(dev, memory_format=self.memory_format)
        self.ddp = None
        if env.distributed:
            # gradient_as_bucket_view: gradients live in DDP's buckets, saving a copy per step
            self.ddp = DDP(
                self.model,
                device_ids=[dev] if dev.type == "cuda" else None,
                gradient_as_bucket_view=True,
                bucket_cap_mb=cfg.dist.bucket_mb,
            )
            if cfg.dist.grad_compression == "bf16":  # all-reduce bf16 copies of the gradients: half the bytes
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                self.ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        self.train_model = self.ddp or self.model
        if t.compile:
            self.train_model = compiled(self.train_model, dev, warn=env.is_main)
        self.ema = make_ema(self.model, t.ema_decay)
        self.precision = resolve_precision(t.precision, dev)
        self.autocast = autocast_for(self.precision, dev)
        self.scaler = grad_scaler(self.precision, dev)
        self.optimizer = make_optimizer(self.model, t, dev, self.precision)
        self.scheduler = make_scheduler(self.optimizer, t, t.epochs * self.batches.steps_per_epoch)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.evaluator = Evaluator.from_config(cfg, dev)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.meter = TrainMeter(dev, t.batch_size)
        self.seconds = {"eval": 0.0, "save": 0.0}
        self.last_save_s, self.last_save_end = 0.0, time.perf_counter()  # for the checkpoint overhead rule
        self.history, self.meta = [], dict(meta or {})

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.contiguous(memory_format=self.memory_format)
        with self.autocast:
            out = self.train_model(x)
            loss = self.loss_fn(out, y)
        # under DDP the gradients are views into its buckets (gradient_as_bucket_view): zero them in place,
        # or autograd allocates new ones each step and DDP copies them back into the buckets
        self.optimizer.zero_grad(set_to_none=self.ddp is None)
        self.scaler.scale(loss).backward()  # DDP all-reduces gradients bucket by bucket during backward
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.ema.update(self.model)
        self.meter.add(loss, out, y)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> Outcome:
        """Train to the end or until a signal; checkpoints as configured."""
        c, spe = self.cfg, self.batches.steps_per_epoch
        self.meter.start_clock()
        while self.epoch < c.train.epochs:
            bar = progress_bar(
                self.env.is_main,
                c.log.progress,
                spe,
                f"epoch {self.epoch + 1}/{c.train.epochs}",
                self.step_in_epoch,
            )
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
                if (
                    c.checkpoint.every_steps
                    and self.global_step % c.checkpoint.every_steps == 0
                    and self.step_in_epoch < spe
                ):
                    with self.meter.paused():
                        self.save()
            bar.close()
            saved = self.end_epoch()
            if self.preemption.drain() and self.epoch < c.train.epochs:
                return self.stop(saved=saved)
        return Outcome.DONE

    def log_interval(self, bar) -> None:
        """Sum the interval's metrics over ranks (the one collective and host sync of the interval) and log."""
        interval = self.meter.flush()
        lr = self.scheduler.get_last_lr()[0]
        bar.set_postfix_str(f"loss {interval['train/loss']:.4f} lr {lr:.4g}")
        record = {
            "kind": "step",
            "epoch": self.epoch,
            "step": self.global_step,
            "train/loss": interval["train/loss"],
            "train/acc": interval["train/acc"],
            "lr": lr,
            "images_per_s": interval["images_per_s"],
        }
        if self.env.device.type == "cuda":
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.logger.log(record)

    def end_epoch(self) -> bool:
        """Evaluate, log the epoch, and save when the checkpoint cadence says so; True if it saved."""
        with self.meter.paused():
            train = self.meter.end_epoch()
            record = {
                "kind": "epoch",
                "epoch": self.epoch,
                "step": self.global_step,
                "world_size": self.env.world_size,
                "train/loss": train["train/loss"],
                "train/acc": train["train/acc"],
                "lr": self.scheduler.get_last_lr()[0],
                "images_per_s": train["images_per_s"],
            }
            start = time.perf_counter()
            result = self.evaluate()
            self.seconds["eval"] += time.perf_counter() - start
            confusion = result.pop("confusion")
            record.update(result)
            self.history.append({"epoch": self.epoch, "confusion": confusion})
            self.logger.log(record, self.media(confusion))
            self.epoch += 1
            self.step_in_epoch = 0
            if self.epoch_save_due():
                self.save()
                return True
        return False

    def time_split(self) -> dict[str, float]:
        """Seconds of this process spent training, evaluating and saving checkpoints."""
        return {"train": self.meter.train_s, **self.seconds}

    def evaluate(self) -> dict:
        broadcast_buffers(self.ema.module)  # rank 0's BatchNorm statistics, the ones the checkpoint holds
        return self.evaluator.evaluate(self.ema.module, self.data.test_x, self.data.test_y, self.env)

    def media(self, confusion: list) -> EpochMedia:
        """The epoch's pictures for the loggers: misclassified images only when one of them shows them."""
        errors = []
        if self.logger.wants_examples:
            errors = self.evaluator.misclassified(self.ema.module, self.data.test_x, self.data.test_y)
        return EpochMedia(self.epoch, confusion, errors)

    def stop(self, saved: bool = False) -> Outcome:
        self.preemption.drain()
        if not saved:
            self.save()
        if self.env.is_main:
            print(
                f"preempted: checkpoint saved at step {self.global_step}; the same command resumes from it",
                flush=True,
            )
        return Outcome.PREEMPTED

    # ---- checkpoints ----------------------------------------------------------------------------
    def epoch_save_due(self) -> bool:
        """The last epoch always saves; others every `checkpoint.every_epochs`, unless saving would take more
        than `checkpoint.max_overhead` of the time since the previous save (fast GPUs, tiny epochs). Rank 0's
        clock decides for all: every rank takes part in a save."""
        c = self.cfg.checkpoint
        if self.epoch >= self.cfg.train.epochs:
            return True
        if self.epoch % c.every_epochs:
            return False
        since = time.perf_counter() - self.last_save_end
        return rank0_decides(self.last_save_s <= c.max_overhead * (since + self.last_save_s), self.env.device)

    def save(self) -> None:
        start = time.perf_counter()
        state = self.state_dict()  # collective: every rank calls save() at the same step
        if self.env.is_main and self.run_dir is not None:
            checkpoint.save(state, self.run_dir / "checkpoints", self.global_step, self.cfg.checkpoint.keep)
        self.last_save_end = time.perf_counter()
        self.last_save_s = self.last_save_end - start
        self.seconds["save"] += self.last_save_s

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (all ranks take part: it gathers RNG states)."""
        meter = self.meter.state_dict()  # collective
        rngs = [checkpoint.rng_state(self.gen)] * self.env.world_size
        if self.env.distributed:
            dist.all_gather_object(rngs, rngs[0])
        return {
            "model": self.model.state_dict(),  # the unwrapped module: no "module." prefixes
            "ema": self.ema.state_dict(),  # None without EMA; evaluation uses these weights when present
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "sampler_seed": self.batches.sampler.seed,
                **meter,
            },
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "world_size": self.env.world_size,
            "history": self.history,
            **self.meta,
        }

    def load_state_dict(self, state: dict) -> None:
        saved_model = state["config"]["model"]
        if saved_model != self.cfg.to_dict()["model"]:
            raise checkpoint.CheckpointError(
                f"checkpoint model config {saved_model} differs from this run's "
                f"{self.cfg.to_dict()['model']}: refusing to load it"
            )
        self.model.load_state_dict(state["model"])
        if state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state[
            "scaler"
        ]:  # empty when the saving run had no GradScaler (bf16, fp32): fp16 starts a fresh one
            self.scaler.load_state_dict(state["scaler"])
        p = state["progress"]  # counts global batches and sums over ranks: carries over to another world size
        self.epoch, self.step_in_epoch, self.global_step = p["epoch"], p["step_in_epoch"], p["global_step"]
        self.batches.sampler.seed = p[
            "sampler_seed"
        ]  # the run's data order, even if run.seed was changed since
        self.meter.load_state_dict(p, self.env.is_main)
        rngs = state["rng"]
        restored = self.env.rank < len(rngs) and checkpoint.set_rng_state(rngs[self.env.rank], self.gen)
        if (
            not restored
        ):  # a new rank after a resize, or a checkpoint from another kind of device: a fresh stream
            self.gen.manual_seed(augment_seed(self.cfg.run.seed, self.env.rank, self.global_step))
            saved_on = rngs[0].get("augment_device", "cpu")
            if self.env.is_main and saved_on != self.gen.device.type:
                print(
                    f"note: the checkpoint's augmentation random streams were saved on {saved_on} and cannot be "
                    f"restored on {self.gen.device.type}: reseeded from run.seed and step {self.global_step} (the "
                    "run goes on, not bit-identical to an uninterrupted one)",
                    flush=True,
                )
        self.history = list(state.get("history", []))
