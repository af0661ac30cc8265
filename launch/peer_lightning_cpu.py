"""The CPU peer of launch/cpu_peer.sh: this project's network trained by Lightning's Trainer, the way its users
write it, with N processes on the CPU (DDP over gloo, fp32), on the same global batch as ours.

Same as `python -m resnet_dist.bench --mode trainer` with configs/cpu.yaml under torchrun: ResNet-18 with the 7x7
stem at 28x28 (resnet_dist.model.build_model), cross-entropy with label smoothing 0.1, SGD nesterov (lr 0.1,
momentum 0.9, weight decay 5e-4) under a one-cycle schedule, the training set as tensors in memory, random
batches normalised and flipped on the whole batch (no DataLoader workers: both sides measure the training step).
Lightning decides everything else (its DDP settings, threads per process, its loop).

Usage: PYTHONPATH=REPO python peer_lightning_cpu.py DATA_ROOT RANKS GLOBAL_BATCH STEPS [WARMUP] -> one JSON line
(rank 0). Lightning restarts this script once per extra rank (its subprocess launcher), so run it as a file.
PEER_PROFILE=FILE writes rank 0's torch.profiler table of 3 steps after the timed ones to FILE.
"""

import json
import os
import resource
import sys
import time

import lightning as L
import torch
from torch.nn import functional as F

from resnet_dist.config import ModelConfig
from resnet_dist.fashion_mnist import MEAN, STD, load_split, prepare
from resnet_dist.model import build_model

root, ranks, global_batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
warmup = int(sys.argv[5]) if len(sys.argv) > 5 else 3
per_rank = global_batch // ranks
profile_to = os.environ.get("PEER_PROFILE")
PROFILED = 3 if profile_to else 0


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = build_model(ModelConfig(stem="imagenet", init="kaiming"))

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y, label_smoothing=0.1)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        total = warmup + steps + PROFILED + 1
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class InMemory:
    """The training set as one uint8 tensor; each rank its own random batches of `per_rank`, normalised and
    half of them flipped, batch-wise (what this project's data path does)."""

    def __init__(self):
        self.x, self.y = load_split(prepare(root), "train", None)
        self.gen = torch.Generator().manual_seed(int(os.environ.get("LOCAL_RANK", "0")))

    def __len__(self):
        return len(self.y) // per_rank

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.gen)
        for i in range(len(self)):
            idx = perm[i * per_rank : (i + 1) * per_rank]
            x = (self.x[idx].float() / 255 - MEAN) / STD
            flip = torch.rand(len(idx), 1, 1, 1, generator=self.gen) < 0.5
            yield torch.where(flip, x.flip(3), x), self.y[idx]


class Timer(L.Callback):
    t0 = t1 = None
    prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == warmup:
            self.t0, self.f0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if batch_idx == warmup + steps:
            self.t1, self.f1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            if PROFILED and trainer.is_global_zero:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

    def on_train_end(self, trainer, pl_module):
        if self.t1 is None:
            self.t1, self.f1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            with open(profile_to, "w") as f:
                f.write(table + "\n")


def main():
    timer = Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy="ddp" if ranks > 1 else "auto",
        precision="32-true",
        max_steps=warmup + steps + PROFILED,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(Module(), InMemory())
    if trainer.is_global_zero:
        dt = timer.t1 - timer.t0
        result = {
            "peer": "lightning",
            "ranks": ranks,
            "global_batch": global_batch,
            "steps": steps,
            "images_per_s": round(steps * global_batch / dt, 1),
            "step_ms": round(1000 * dt / steps, 2),
            "page_faults_per_step": round((timer.f1 - timer.f0) / steps),  # rank 0's minor faults
            "threads_per_rank": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "lightning": L.__version__,
            "torch": torch.__version__,
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
