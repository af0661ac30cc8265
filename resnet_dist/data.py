"""The data path on the device: Fashion-MNIST's splits held as uint8 tensors on the training device; each rank's
batches gathered from them with indices from `DistributedSampler`; crop, flip, erasing and resize on the whole
batch on the device. No per-sample transform, no workers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from .config import Config, DataConfig
from .fashion_mnist import MEAN, STD, load_split, prepare

log = logging.getLogger(__name__)


def normalize(x_uint8: torch.Tensor, resize: int | None) -> torch.Tensor:
    x = (x_uint8.float() / 255.0 - MEAN) / STD
    if resize is not None and resize != x.shape[-1]:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    return x


def augment(x: torch.Tensor, gen: torch.Generator, padding: int, flip: bool, erasing: float) -> torch.Tensor:
    """Random crop (zero padding), horizontal flip and random erasing on a whole normalized batch."""
    n, _, h, w = x.shape
    dev = x.device
    if padding:
        xp = F.pad(x, (padding,) * 4, value=(0.0 - MEAN) / STD)  # pad with black, as torchvision does
        oy = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=gen)
        ox = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=gen)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[
            torch.arange(n, device=dev)[:, None, None, None],
            torch.arange(x.shape[1], device=dev)[None, :, None, None],
            rows,
            cols,
        ]
    if flip:
        mask = torch.rand(n, device=dev, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    if erasing > 0:
        # one rectangle per image: area 2-33% of the image, aspect 0.3-3.3 (the Random Erasing paper's defaults)
        area = torch.empty(n, device=dev).uniform_(0.02, 0.33, generator=gen) * h * w
        log_r = torch.empty(n, device=dev).uniform_(np.log(0.3), np.log(3.3), generator=gen)
        eh = (area * log_r.exp()).sqrt().clamp(1, h).long()
        ew = (area / log_r.exp()).sqrt().clamp(1, w).long()
        y0 = (torch.rand(n, device=dev, generator=gen) * (h - eh + 1)).long()
        x0 = (torch.rand(n, device=dev, generator=gen) * (w - ew + 1)).long()
        ys, xs = torch.arange(h, device=dev)[None, :], torch.arange(w, device=dev)[None, :]
        inside = ((ys >= y0[:, None]) & (ys < (y0 + eh)[:, None]))[:, :, None] & (
            (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])
        )[:, None, :]
        apply = torch.rand(n, device=dev, generator=gen) < erasing
        x = x.masked_fill((inside & apply[:, None, None])[:, None], 0.0)  # erase to the mean
    return x


@dataclass
class TrainBatches:
    """Each rank's training batches for one epoch: sampler indices -> gather on device -> augment."""

    images: torch.Tensor  # uint8 [N, 1, 28, 28] on the device
    labels: torch.Tensor
    batch_size: int  # per rank
    rank: int
    world_size: int
    seed: int
    cfg: DataConfig

    @classmethod
    def for_rank(cls, data: Splits, cfg: Config, rank: int, world_size: int) -> TrainBatches:
        """This rank's share of each global batch of `cfg.train.batch_size` (`cfg` is the whole Config)."""
        return cls(
            data.train_x,
            data.train_y,
            cfg.train.batch_size // world_size,
            rank,
            world_size,
            cfg.run.seed,
            cfg.data,
        )

    def __post_init__(self):
        self.sampler = DistributedSampler(
            range(len(self.labels)),
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // self.batch_size
        assert self.steps_per_epoch > 0, (
            f"{len(self.labels)} training images give no full batch of "
            f"{self.batch_size} per rank on {self.world_size} ranks"
        )

    def epoch(self, epoch: int, gen: torch.Generator, start_step: int = 0):
        """Yield (x, y) for steps start_step..steps_per_epoch-1 of `epoch` (the same on every rank count)."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.images.device)
        for step in range(start_step, self.steps_per_epoch):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            x = normalize(self.images[idx], self.cfg.resize)
            x = augment(x, gen, self.cfg.crop_padding, self.cfg.flip, self.cfg.erasing)
            yield x, self.labels[idx]


@dataclass
class Splits:
    """The training and test splits, uint8 images [N, 1, 28, 28] and int64 labels, on the training device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_splits(cfg: DataConfig, device: torch.device) -> Splits:
    """Prepare the dataset (once per filesystem) and put both splits on `device` (`cfg` is a DataConfig)."""
    raw = prepare(cfg.root, cfg.mirror)
    train, test = load_split(raw, "train", cfg.train_subset), load_split(raw, "test", cfg.test_subset)
    return Splits(*(t.to(device) for t in (*train, *test)))


def augment_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's augmentation stream. 100_003 (a prime above any rank count) keeps (seed, rank)
    pairs apart; a stream started later (a rank added by a resize, a reseed) also mixes in the step."""
    return seed * 100_003 + rank + 7919 * step


def eval_shard(n: int, rank: int, world_size: int) -> slice:
    """A contiguous, unpadded shard: the shards of all ranks cover 0..n-1 exactly once."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)
