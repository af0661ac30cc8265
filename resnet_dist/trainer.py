"""Trainer: the state of one run and the loop that advances it, identical on 1 CPU or 64 GPUs.

Everything it works with is built by the entry point and passed in (the data on the device, the loggers,
the preemption handler): the Trainer never reads a file, installs a signal handler or creates a process
group, so `fit()` runs in a test on a few synthetic tensors.
"""

from __future__ import annotations

import enum
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, optim, perf, step
from .amp import autocast_for, loss_scaler, resolve_precision
from .config import Config
from .data import Splits, TrainBatches, augment_seed
from .distributed import DistEnv, all_gather_object, broadcast_buffers, rank0_decides
from .evaluate import Evaluator
from .graphs import CaptureError, CudaGraphs, GraphedEvaluation
from .loggers import EpochMedia, NullLogger, fmt, progress_bar
from .metrics import LossGuard, TrainMeter
from .model import build_model, memory_format, wrap_ddp
from .preemption import NoPreemption, Preemption
from .profiling import NoProfiler

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    DONE = "done"  # trained to the last epoch
    PREEMPTED = "preempted"  # stopped by a signal after saving a checkpoint: the same command resumes


class Trainer:
    # components
    cfg: Config
    env: DistEnv
    model: nn.Module  # the plain module: what checkpoints hold and `evaluate` rebuilds
    ddp: nn.Module | None  # the model under DDP; None in a single process
    train_model: nn.Module  # what a step calls: the DDP wrapper or the model
    # progress: the epoch and the step within it to run next, and the global step count
    epoch: int
    step_in_epoch: int
    global_step: int
    # metrics: the meter has the training loss, accuracy and time; the guard stops a diverging run
    meter: TrainMeter
    guard: LossGuard
    # run bookkeeping: one confusion matrix per epoch (plots.py draws the last); what every checkpoint carries
    history: list[dict]
    meta: dict

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        data: Splits,
        run_dir: Path | None = None,
        logger=None,
        preemption: Preemption | None = None,
        meta: dict | None = None,
        profiler=None,
        graphs=None,
    ):
        self.cfg, self.env, self.data, self.run_dir = cfg, env, data, run_dir
        self.logger, self.preemption = logger or NullLogger(), preemption or NoPreemption()
        self.profiler = profiler or NoProfiler()
        train, dev = cfg.train, env.device
        # the same initial weights on every rank (DDP also broadcasts rank 0's)
        torch.manual_seed(cfg.run.seed)
        self.batches = TrainBatches.for_rank(data, cfg, env.rank, env.world_size)
        self.gen = torch.Generator(device=dev).manual_seed(augment_seed(cfg.run.seed, env.rank))
        self.memory_format = memory_format(dev)
        self.model = build_model(cfg.model).to(dev, memory_format=self.memory_format)
        if cfg.model.sync_bn and env.distributed:  # BatchNorm over the global batch (CUDA only, see train.py)
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.precision = resolve_precision(train.precision, dev)
        # the step is captured as a CUDA graph unless `eager_why` says why not (CaptureError: `on` cannot be)
        self.graphs = graphs or (CudaGraphs() if dev.type == "cuda" else None)
        self.eager_why = step.plan(
            train.cuda_graphs, self.graphs is not None, self.precision, env.world_size, env.backend, cfg
        )
        self.stream = self.graphs.stream() if self.eager_why is None else None
        with self.graphs.on(self.stream) if self.stream is not None else nullcontext():
            # under capture DDP is built on the stream the warm-up and the capture use (PyTorch's CUDA graph
            # notes): it binds its gradient accumulation to the stream it was made on
            self.ddp = wrap_ddp(self.model, env, cfg.dist.bucket_mb, cfg.dist.grad_compression)
        self.train_model = self.ddp or self.model
        self.ema = optim.make_ema(self.model, train.ema_decay)
        self.optimizer = optim.make_optimizer(
            self.model, train, dev, self.precision, lr_tensor=self.eager_why is None
        )
        self.schedule = optim.Schedule(self.optimizer, train, train.epochs * self.batches.steps_per_epoch)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
        self.evaluator = Evaluator.from_config(cfg, dev)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.meter = TrainMeter(dev, train.batch_size)
        self.eval_s, self.cadence = 0.0, checkpoint.SaveCadence(cfg.checkpoint, train.epochs)
        self.guard = LossGuard(train.lr)
        self.history, self.meta = [], dict(meta or {})
        self.mfu_factor = perf.mfu_per_image_per_s(cfg, dev, self.precision)  # None off GPUs
        self.parts = step.Parts(
            self.model,
            self.train_model,
            self.ddp,
            self.optimizer,
            self.schedule,
            loss_scaler(self.precision, self.model, dev),  # fp16's loss scaling, else a no-op
            self.ema,
            self.meter,
            self.loss_fn,
            self.autocast_for_step(),
            self.memory_format,
            train.accum_steps,
        )
        self.step = step.EagerStep(self.parts)
        self.graphed_eval: GraphedEvaluation | None = None  # the evaluation as a CUDA graph, with the step
        self.capture_s = 0.0

    @property
    def amp(self):
        """fp16's loss scaler (a no-op otherwise), as the step uses it."""
        return self.parts.amp

    @amp.setter
    def amp(self, scaler) -> None:
        self.parts.amp = scaler

    def autocast_for_step(self):
        # a captured step enters autocast inside the graph, without its cast cache (PyTorch's CUDA graph notes)
        return autocast_for(self.precision, self.env.device, cache=self.eager_why is not None)

    def capture(self) -> str:
        """Capture the step, then the evaluation, as CUDA graphs when the plan says so (from this state, which it
        keeps: weights, momentum, statistics, the augmentation stream); what the run does, in words for rank 0's
        first line. Under `auto` a failure falls back to eager with a warning; under `on` it raises CaptureError."""
        if self.eager_why is not None:
            return f"eager ({self.eager_why})"
        start, rng = time.perf_counter(), self.gen.get_state()
        batches = self.batches.epoch(self.epoch, self.gen, start_step=0)
        how = "captured"
        try:
            self.step = step.capture(
                self.parts, self.step, batches, self.global_step, self.precision, self.graphs, self.stream
            )
            self.graphed_eval = GraphedEvaluation.checked(
                self.evaluator, self.ema.module, self.data.test_x, self.data.test_y, self.graphs, self.stream
            )
        except CaptureError as e:
            if self.cfg.train.cuda_graphs == "on":
                raise
            part = "evaluation" if self.step.captured else "step"
            log.warning(f"the {part} runs eagerly: {e}")
            how = "captured, evaluation eager" if self.step.captured else f"eager (the capture failed: {e})"
        finally:
            self.gen.set_state(rng)
            self.capture_s = time.perf_counter() - start
        return how

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on this rank's share of the global batch, in `train.accum_steps` micro-batches."""
        self.step(x, y, self.global_step)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> Outcome:
        """Train to the end or until a signal; checkpoints as configured."""
        epochs, per_epoch = self.cfg.train.epochs, self.batches.steps_per_epoch
        log_every, save_every = self.cfg.log.every_steps, self.cfg.checkpoint.every_steps
        self.meter.start_clock()
        while self.epoch < epochs:
            title = f"epoch {self.epoch + 1}/{epochs}"
            bar = progress_bar(self.env.is_main, self.cfg.log.progress, per_epoch, title, self.step_in_epoch)
            for x, y in self.batches.epoch(self.epoch, self.gen, start_step=self.step_in_epoch):
                self.train_step(x, y)
                self.profiler.step()
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update()
                last = self.step_in_epoch == per_epoch
                if self.global_step % log_every == 0 or last:
                    self.log_interval(bar)
                if not last and self.preemption.agreed(self.global_step):
                    bar.close()
                    return self.stop()
                if not last and save_every and self.global_step % save_every == 0:
                    with self.meter.paused():
                        self.save()
            bar.close()
            saved = self.end_epoch()
            if self.preemption.drain() and self.epoch < epochs:
                return self.stop(saved=saved)
        return Outcome.DONE

    def log_interval(self, bar) -> None:
        """Sum the interval's metrics over ranks (the one collective and host sync of the interval) and log."""
        interval, amp = self.meter.flush(), self.amp.interval_record()
        lr = self.schedule.at(self.global_step - 1)  # the last step's
        hopeless = self.amp.hopeless()  # fp16 only: the same on every rank
        if hopeless:
            raise self.guard.diverged(self.global_step, hopeless)
        self.guard.check(self.global_step, interval["train/loss"])
        bar.set_postfix_str(f"loss {fmt(interval['train/loss'])} lr {lr:.4g}")
        record = {"kind": "step", "epoch": self.epoch, "step": self.global_step, **interval, "lr": lr, **amp}
        if self.mfu_factor:
            record["mfu"] = self.mfu_factor * interval["images_per_s"] / self.env.world_size
        if self.env.device.type == "cuda":
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.logger.log(record)

    def end_epoch(self) -> bool:
        """Evaluate, log the epoch, and save when the checkpoint cadence says so; True if it saved."""
        with self.meter.paused():
            record = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step}
            record.update(world_size=self.env.world_size, **self.meter.end_epoch())
            record["lr"] = self.schedule.at(self.global_step - 1)
            start = time.perf_counter()
            result = self.evaluate()
            self.eval_s += time.perf_counter() - start
            confusion = result.pop("confusion")
            record.update(result)
            self.guard.check(self.global_step, record["train/loss"], record["test/loss"])
            self.history.append({"epoch": self.epoch, "confusion": confusion})
            self.logger.log(record, self.media(confusion))
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            if rank0_decides(self.cadence.due(self.epoch), self.env.device):  # rank 0's clock, for all
                self.save()
                return True
        return False

    def evaluate(self) -> dict:
        broadcast_buffers(self.ema.module)  # rank 0's BatchNorm statistics, the ones the checkpoint holds
        module, x, y = self.ema.module, self.data.test_x, self.data.test_y
        return self.evaluator.evaluate(module, x, y, self.env, self.graphed_eval)

    def media(self, confusion: list) -> EpochMedia:
        """The epoch's pictures for the loggers: misclassified images only when one of them shows them."""
        wanted, ema, data = self.logger.wants_examples, self.ema.module, self.data
        errors = self.evaluator.misclassified(ema, data.test_x, data.test_y) if wanted else []
        return EpochMedia(self.epoch, confusion, errors)

    def time_split(self) -> dict[str, float]:
        """Seconds of this process spent training, evaluating and saving checkpoints."""
        return {"train": self.meter.train_s, "eval": self.eval_s, "save": self.cadence.total_s}

    def stop(self, saved: bool = False) -> Outcome:
        self.preemption.drain()
        if not saved:
            self.save()
        log.info(f"preempted: checkpoint saved at step {self.global_step}; the same command resumes")
        return Outcome.PREEMPTED

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        with self.cadence.timed():
            state = self.state_dict()  # collective: every rank calls save() at the same step
            if not checkpoint.finite(state):  # the same weights on every rank: all stop here together
                raise self.guard.diverged(self.global_step, "the weights are not finite")
            # rank 0 writes; every rank learns whether it could (a full disk), rather than finding rank 0 gone
            # at the next collective and blaming a dead peer
            error = None
            if self.env.is_main and self.run_dir is not None:
                try:
                    checkpoint.save(
                        state, self.run_dir / "checkpoints", self.global_step, self.cfg.checkpoint.keep
                    )
                except checkpoint.SaveError as e:
                    error = e
            if not rank0_decides(error is None, self.env.device):
                raise error or checkpoint.SaveError(
                    "rank 0 could not write the checkpoint (its error says why)"
                )

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (all ranks take part: it gathers RNG states)."""
        progress = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}
        progress.update(sampler_seed=self.batches.sampler.seed, **self.meter.state_dict())  # collective
        return {
            "model": self.model.state_dict(),  # the unwrapped module: no "module." prefixes
            "ema": self.ema.state_dict(),  # None without EMA; evaluation uses these weights when present
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.amp.state_dict(),  # None unless fp16
            "progress": progress,
            "rng": all_gather_object(checkpoint.rng_state(self.gen)),  # every rank's streams (collective)
            "config": self.cfg.to_dict(),
            "world_size": self.env.world_size,
            "history": self.history,
            **self.meta,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        optim.load_optimizer_state(self.optimizer, state["optimizer"])
        optim.apply_settings(self.optimizer, self.cfg.train)  # a changed momentum, weight decay, ...
        self.amp.load_state_dict(state["scaler"])  # a run that was not fp16 saved None: fp16 starts afresh
        # progress counts global batches, the meter's sums are over all ranks: both carry over to any world size
        p = state["progress"]
        self.epoch, self.step_in_epoch, self.global_step = p["epoch"], p["step_in_epoch"], p["global_step"]
        self.batches.sampler.seed = p["sampler_seed"]  # the run's data order, even if run.seed changed since
        self.meter.load_state_dict(p, self.env.is_main)
        fresh = augment_seed(self.cfg.run.seed, self.env.rank, self.global_step)
        checkpoint.restore_rng(state["rng"], self.env.rank, self.gen, fresh, say=self.env.is_main)
        self.history = list(state.get("history", []))
