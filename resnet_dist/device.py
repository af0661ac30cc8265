"""This process's device: which one it computes on, whether another rank shares its GPU, and the kernel switches
set once at its start (cuDNN's autotuner, or the deterministic kernels)."""

from __future__ import annotations

import os
import socket

import torch

CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS's fixed workspace: its deterministic mode (CUDA's documentation)


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """Fast: cuDNN picks the fastest convolution algorithms for our fixed shapes (a one-off search per
    shape). Deterministic (run.deterministic): only deterministic kernels (an op without one raises), no
    autotuner; the entry points set CUBLAS_WORKSPACE_CONFIG before CUDA starts."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def device_for(local_rank: int, gpus: int) -> torch.device:
    """The CPU without GPUs; cuda:0 when the task sees exactly one GPU (SLURM --gpus-per-task=1, --gpu-bind,
    or a site that sets CUDA_VISIBLE_DEVICES per task); else the GPU of the local rank (check_launch has
    made sure there are enough)."""
    if gpus == 0:
        return torch.device("cpu")
    return torch.device("cuda", 0 if gpus == 1 else local_rank)


def gpu_identity(device: torch.device) -> str:
    """Host and GPU UUID: two processes with the same identity would share one GPU."""
    return f"{socket.gethostname()} {torch.cuda.get_device_properties(device).uuid}"


def shared_gpu(identities: list[str]) -> str | None:
    """Why the ranks cannot run (two of them see the same single GPU), or None."""
    first: dict[str, int] = {}
    for rank, ident in enumerate(identities):
        if ident in first:
            host, _, uuid = ident.partition(" ")
            return (
                f"ranks {first[ident]} and {rank} both see only GPU {uuid} on {host}: each process sees one GPU "
                "but not its own; bind one GPU per task (srun --gpus-per-task=1) or let every process see all "
                "of the node's GPUs (dist.backend=gloo runs several ranks on one GPU, slowly: for tests)"
            )
        first[ident] = rank
    return None
