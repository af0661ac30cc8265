"""One distributed path, read from the environment: torchrun / accelerate, srun, or a single process."""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # torchrun | accelerate | srun | none
    device: torch.device
    backend: str | None  # nccl | gloo | None (single process)
    num_nodes: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the run directory, the console, metrics.jsonl and W&B."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, bracket = m.group(1), m.group(3)
    if bracket is None:
        return prefix
    return prefix + bracket.split(",")[0].split("-")[0]


def detect(env=os.environ) -> dict:
    """Rank, local rank, world size, master address/port and launcher name from the environment."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun and accelerate launch
        launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
        return dict(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                    world_size=int(env["WORLD_SIZE"]), launcher=launcher,
                    master_addr=env.get("MASTER_ADDR"), master_port=env.get("MASTER_PORT"),
                    num_nodes=max(1, int(env["WORLD_SIZE"]) // max(1, int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
        job = int(env.get("SLURM_JOB_ID", "0"))
        return dict(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                    world_size=int(env["SLURM_NTASKS"]), launcher="srun",
                    master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "localhost")),
                    # a port derived from the job id: the tasks agree without talking, two jobs differ
                    master_port=env.get("MASTER_PORT") or str(20000 + job % 20000),
                    num_nodes=int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1))))
    return dict(rank=0, local_rank=0, world_size=1, launcher="none", master_addr=None, master_port=None, num_nodes=1)


def setup(timeout_s: int = 600) -> DistEnv:
    """Bind the device and create the process group (a no-op for a single process)."""
    info = detect()
    if torch.cuda.is_available():
        local = info["local_rank"]
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} but only {torch.cuda.device_count()} GPUs are visible: "
                               "start at most one task per GPU on each node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if info["world_size"] == 1:
        backend = None
    else:
        if not info["master_addr"] or not info["master_port"]:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set: start with torchrun, srun or accelerate launch")
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = info["master_addr"], str(info["master_port"])
        dist.init_process_group(backend=backend, rank=info["rank"], world_size=info["world_size"],
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    return DistEnv(rank=info["rank"], local_rank=info["local_rank"], world_size=info["world_size"],
                   launcher=info["launcher"], device=device, backend=backend, num_nodes=info["num_nodes"])


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def explain_failure(e: BaseException, timeout_s: int) -> str | None:
    """A one-line cause for a failed collective (a peer died or hangs), or None if `e` is something else."""
    text = f"{type(e).__name__}: {e}"
    markers = ("Connection closed by peer", "Connection reset", "Broken pipe", "timed out", "Timeout",
               "NCCL", "Gloo", "gloo", "DistBackendError", "DistNetworkError", "DistStoreError")
    if not (isinstance(e, getattr(dist, "DistError", ())) or any(m in text for m in markers)):
        return None
    first = text.strip().splitlines()[0][:300]
    return (f"a collective operation failed ({first}). Likely cause: another rank died (out of memory, killed, "
            f"crashed: see its log) or stopped responding for over dist.timeout_s={timeout_s}s")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place (nothing to do for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
