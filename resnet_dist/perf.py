"""What a step costs and what the chip could do: FLOPs counted on the model, datasheet peaks, a measured
ceiling, and a clock that reads the device timeline. Used by the benchmark and by the training log (MFU)."""

from __future__ import annotations

import os
import time

import torch

from .config import Config
from .model import build_model

# Dense peak TFLOP/s per GPU, from the vendor datasheets (the 2:4-sparsity figures halved):
# (bf16/fp16 tensor cores, TF32 tensor cores, plain FP32). Keyed by the exact name CUDA reports: substrings
# would confuse H100 SXM / PCIe / NVL, or L4 / L40 / L40S. An unknown name gets no datasheet MFU; the
# utilisation against the measured bf16 matrix product (`matmul_ceiling_tflops`) is reported on every GPU.
_H100_SXM, _H100_NVL, _A100 = (989.4, 494.7, 66.9), (835.5, 417.5, 60.0), (312.0, 156.0, 19.5)
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": (756.5, 378.0, 51.2),
    "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H200": _H100_SXM,
    "NVIDIA H200 NVL": _H100_NVL,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA L40S": (362.0, 183.0, 91.6),
    "NVIDIA L40": (181.0, 90.5, 90.5),
    "NVIDIA L4": (121.0, 60.0, 30.3),
    "NVIDIA A10": (125.0, 62.5, 31.2),
    "NVIDIA GeForce RTX 4090": (165.2, 82.6, 82.6),
    "Tesla V100-SXM2-16GB": (125.0, None, 15.7),
    "Tesla V100-SXM2-32GB": (125.0, None, 15.7),
    "Tesla V100-PCIE-16GB": (112.0, None, 14.0),
    "Tesla V100-PCIE-32GB": (112.0, None, 14.0),
}


def device_name(device: torch.device) -> str | None:
    """The GPU's name as CUDA reports it (the key of PEAK_TFLOPS); None on CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def peak_tflops(name: str | None, precision: str, tf32: bool) -> float | None:
    """The datasheet peak for this GPU and precision. "fp32" convolutions run on TF32 tensor cores when
    cuDNN allows it (PyTorch's default on Ampere and newer): then the TF32 peak is the honest one."""
    if name not in PEAK_TFLOPS:
        return None
    half, tf32_peak, single = PEAK_TFLOPS[name]
    if precision in ("bf16", "fp16"):
        return half
    return tf32_peak if tf32 and tf32_peak else single


def matmul_ceiling_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """TFLOP/s of a large bf16 matrix product on this device, now: the most this chip will do for us."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    clock = Clock(device)
    for _ in range(3):
        a @ b
    start = clock.mark()
    for _ in range(iters):
        a @ b
    secs = clock.seconds(start, clock.mark())
    return 2 * n**3 * iters / secs / 1e12


def train_flops_per_image(cfg: Config) -> float:
    """FLOPs of one training step (forward + backward) per image, counted on the model itself."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.model)
    size = cfg.data.resize or 28
    x = torch.randn(2, 1, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


class Clock:
    """Marks on the device timeline (CUDA events) or the host clock (CPU); read once at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1000
        return b - a


def mfu_per_image_per_s(cfg: Config, device: torch.device, precision: str) -> float | None:
    """MFU of one image per second per rank, on GPUs whose datasheet peak is known (None elsewhere): the
    training log multiplies it by images/s. FLOPs counted once, on the model."""
    peak = peak_tflops(device_name(device), precision, torch.backends.cudnn.allow_tf32)
    return train_flops_per_image(cfg) / (peak * 1e12) if peak else None


def since_process_start() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere since this module was imported)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - IMPORTED


IMPORTED = time.perf_counter()


def busy_fraction(step, it, device: torch.device, n: int = 10) -> float | None:
    """The share of wall time in which the GPU ran kernels over `n` steps (the union of the kernels' intervals,
    from the profiler, which adds a little overhead per kernel of its own); None off GPUs."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step(*next(it))
        torch.cuda.synchronize()
    kernels = [
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA
    ]
    host = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CPU]
    return busy_share(kernels, host)


def busy_share(kernels: list[tuple[float, float]], host: list[tuple[float, float]]) -> float | None:
    """The union of the kernels' intervals (kernels on several streams overlap) over the whole profiled span."""
    spans = sorted((a, b) for a, b in kernels if b > a)
    if not spans:
        return None
    busy, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            busy, end = busy + (b - a), b
        elif b > end:
            busy, end = busy + (b - end), b
    everything = spans + list(host)
    wall = max(b for _, b in everything) - min(a for a, _ in everything)
    return busy / wall if wall > 0 else None
