"""The original ResNet-18 (`Residual` blocks with an optional 1x1 projection, built by `resnet_block`), and how it
meets the devices: its memory format, and DistributedDataParallel."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import ModelConfig
from .distributed import DistEnv
from .fashion_mnist import CLASSES


class Residual(nn.Module):
    """Two 3x3 convs with BatchNorm; a 1x1 conv projects the input when shape or stride changes."""

    def __init__(self, in_channels: int, out_channels: int, use_1x1conv: bool = False, strides: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv3 = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=strides) if use_1x1conv else None
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3 is not None:
            X = self.conv3(X)
        return F.relu(Y + X)


def resnet_block(
    in_channels: int, out_channels: int, num_residuals: int, first_block: bool = False
) -> nn.Sequential:
    """A stage: the first Residual halves the resolution and projects, except in the first stage."""
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(in_channels, out_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(out_channels, out_channels))
    return nn.Sequential(*blk)


def stem(kind: str) -> nn.Sequential:
    if kind == "imagenet":  # the original: 224x224 inputs
        return nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    if kind == "cifar":  # keeps 28x28: the stages see 28/14/7/4 instead of 7/4/2/1
        return nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1), nn.BatchNorm2d(64), nn.ReLU()
        )
    raise ValueError(f"unknown stem {kind!r}")


class GlobalAvgPool(nn.Module):
    """The global average pool, as a mean over H and W: nn.AdaptiveAvgPool2d's CUDA backward has no
    deterministic kernel, so run.deterministic would stop at it. No parameters: checkpoints are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


def build_model(cfg: ModelConfig) -> nn.Sequential:
    """ResNet-18 for 1-channel images."""
    net = nn.Sequential(
        stem(cfg.stem),
        resnet_block(64, 64, 2, first_block=True),
        resnet_block(64, 128, 2),
        resnet_block(128, 256, 2),
        resnet_block(256, 512, 2),
        GlobalAvgPool(),
        nn.Flatten(),
        nn.Linear(512, len(CLASSES)),
    )
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if cfg.init == "xavier":  # the original recipe
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (cuDNN's NHWC kernels are the fast ones under autocast: +26% for a ResNet-18);
    contiguous on CPU, where it gains nothing. The one place this is decided: model, training and evaluation."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


# torch 2.13 renamed broadcast_buffers to forward_sync_buffers (and warns on the old name); the new one still
# syncs buffers once at construction, which changes nothing here: every rank starts from the same state.
NO_FORWARD_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)


def wrap_ddp(model: nn.Module, env: DistEnv, bucket_mb: int, compression: str):
    """The model under DDP (None for one process). gradient_as_bucket_view: the gradients live in DDP's
    buckets, saving a copy per step; the bf16 hook all-reduces bf16 copies of them, half the bytes.

    No buffer sync in forward: DDP would otherwise broadcast rank 0's BatchNorm statistics at the start of
    every forward pass, a collective in each step that only overwrites the other ranks' copies. Training
    never reads them (it normalises with the batch's statistics); evaluation and checkpoints use rank 0's
    (`broadcast_buffers` below, before each evaluation), which that broadcast leaves as they are. Without
    it the forward pass is each rank's own work, which the training log's straggler figures time."""
    if not env.distributed:
        return None
    ids = [env.device] if env.device.type == "cuda" else None
    ddp = DDP(model, device_ids=ids, gradient_as_bucket_view=True, bucket_cap_mb=bucket_mb, **NO_FORWARD_SYNC)
    if compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp
