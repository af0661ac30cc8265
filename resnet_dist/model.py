"""The original ResNet-18 (`Residual` blocks with an optional 1x1 projection, built by `resnet_block`), and how it
meets the device: memory format and torch.compile."""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig

import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig

log = logging.getLogger(__name__)


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
        nn.Linear(512, cfg.num_classes),
    )
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if cfg.init == "xavier":  # the original recipe
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    """channels_last on CUDA when asked (cuDNN's NHWC kernels are the fast ones under autocast); contiguous
    on CPU, where it gains nothing. The one place this is decided: model, training and evaluation inputs."""
    return torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format


def compile_unavailable(
    device: torch.device, which=shutil.which, include_dir: str | None = None
) -> str | None:
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


def compiled(module: nn.Module, device: torch.device, warn: bool) -> nn.Module:
    """torch.compile(module), or the module itself with one warning line where Inductor cannot build."""
    missing = compile_unavailable(device)
    if missing is None:
        return torch.compile(module)
    if warn:
        log.warning(
            f"train.compile=true needs a compiler toolchain, but there is {missing}: training "
            "without torch.compile (install gcc, g++ and python3-dev, or set train.compile=false)"
        )
    return module
