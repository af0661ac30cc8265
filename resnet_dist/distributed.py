"""The process group and the collectives: setup() binds this process's device and joins the others (launchcheck
calls it, after its checks), teardown() leaves, and the few collectives the trainer uses, each a no-op for one
process."""

from __future__ import annotations

import datetime
import os
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .device import configure_backends, device_for, gpu_identity, shared_gpu
from .errors import RunError, UsageError, first_line
from .launchenv import LaunchError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # torchrun | accelerate | srun | none
    device: torch.device
    backend: str | None  # nccl | gloo | None (single process)
    num_nodes: int = 1
    warnings: tuple[str, ...] = ()  # launch problems that do not stop the run (rank 0 prints them)

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the run directory, the console, metrics.jsonl and W&B."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_backend(requested: str, device: torch.device) -> str:
    """dist.backend: auto is NCCL on GPUs and gloo on CPU; gloo also takes CUDA tensors (staged through the
    host, slower): the only backend with which several ranks can share one GPU."""
    if requested == "nccl" and device.type != "cuda":
        raise LaunchError("dist.backend=nccl needs GPUs (this process sees none): use auto or gloo")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return requested


def setup(
    info: dict, gpus: int, timeout_s: int = 600, backend: str = "auto", deterministic: bool = False
) -> DistEnv:
    """Bind the device (and its libraries' settings) and create the process group (a no-op for one process).
    `info` is launchenv.detect()'s; launchcheck.start() checks it first. LaunchError when the ranks do not meet.
    """
    device = device_for(info["local_rank"], gpus)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    configure_backends(device, deterministic)
    requested, backend = backend, None
    if info["world_size"] > 1:
        backend = choose_backend(requested, device)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = info["master_addr"], str(info["master_port"])
        timeout = datetime.timedelta(seconds=timeout_s)
        store = join_store(info, timeout_s)
        # one GPU per task, unless the tasks all see the same one (NCCL refuses two ranks on one GPU; gloo
        # runs them, for testing the multi-rank code on a one-GPU machine)
        if gpus == 1 and info["local_world_size"] > 1 and backend == "nccl":
            clash = shared_gpu(exchange(store, "gpu", info["rank"], info["world_size"], gpu_identity(device)))
            if clash:
                raise LaunchError(clash)
        try:  # in this thread: NCCL binds its communicator to this thread's device
            dist.init_process_group(
                backend=backend,
                store=store,
                rank=info["rank"],
                world_size=info["world_size"],
                timeout=timeout,
                device_id=device if backend == "nccl" else None,
            )
        except Exception as e:  # noqa: BLE001 - a rendezvous failure becomes one line, anything else as it is
            raise rendezvous_error(e, timeout_s, info) from None
    return DistEnv(
        rank=info["rank"],
        local_rank=info["local_rank"],
        world_size=info["world_size"],
        launcher=info["launcher"],
        device=device,
        backend=backend,
        num_nodes=info["num_nodes"],
    )


def join_store(info: dict, timeout_s: float) -> dist.Store:
    """The rendezvous store (rendezvous_store), joined within dist.timeout_s, its failure one line (LaunchError).

    A store client that reached a program other than rank 0 on MASTER_PORT waits for an answer that never
    comes, past any timeout of its own: it joins in a thread the process leaves behind when it gives up.
    """
    joined: dict = {}  # "store", or "error": what the joining thread got

    def join():
        try:
            joined["store"] = rendezvous_store(info, datetime.timedelta(seconds=timeout_s))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            joined["error"] = e

    thread = threading.Thread(target=join, daemon=True)
    thread.start()
    thread.join(timeout_s + 5)
    if thread.is_alive():
        raise LaunchError(
            f"rank {info['rank']} got no answer from rank 0's rendezvous at {info['master_addr']}:"
            f"{info['master_port']} within dist.timeout_s={timeout_s:g}s: is another program holding that "
            "port (MASTER_PORT), or rank 0 stuck?"
        )
    if "error" in joined:
        raise rendezvous_error(joined["error"], timeout_s, info)
    return joined["store"]


def rendezvous_error(e: BaseException, timeout_s: float, info: dict) -> BaseException:
    """A one-line LaunchError for a rendezvous that failed (a busy port, ranks that never all came), else `e`."""
    text, where = str(e), f"{info['master_addr']}:{info['master_port']}"
    if "EADDRINUSE" in text or "address already in use" in text:
        return LaunchError(
            f"rank 0 cannot listen on {where}: the port is in use by another program; choose a free "
            "MASTER_PORT (torchrun --rdzv-endpoint=HOST:0 picks one)"
        )
    if "waiting for clients" in text or "connect to" in text or "timed out" in text.lower():
        first = first_line(e)
        return LaunchError(
            f"rank {info['rank']}: the {info['world_size']} ranks did not all meet at {where} within "
            f"dist.timeout_s={timeout_s:g}s ({first}): start every rank, with the same MASTER_ADDR/PORT"
        )
    return e


def exchange(store: dist.Store, key: str, rank: int, world_size: int, value: str) -> list[str]:
    """Every rank's `value`, through the rendezvous store (before any process group exists)."""
    store.set(f"{key}/{rank}", value)
    keys = [f"{key}/{r}" for r in range(world_size)]
    store.wait(keys)
    return [store.get(k).decode() for k in keys]


def rendezvous_store(info: dict, timeout: datetime.timedelta, env=os.environ) -> dist.Store:
    """The key-value store the ranks meet in, with a prefix per torchrun restart.

    torchrun's agent keeps one store across restarts: without the prefix, a restarted rank 0 reads the
    dead attempt's addresses and fails to connect ("Connection refused").
    """
    agent_hosts = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves the store
    store = dist.TCPStore(
        info["master_addr"],
        int(info["master_port"]),
        info["world_size"],
        is_master=info["rank"] == 0 and not agent_hosts,
        timeout=timeout,
    )
    return dist.PrefixStore(f"resnet_dist/attempt_{info['restart']}", store)


def in_group() -> bool:
    """Whether a process group exists (collectives run); without one, the helpers below are for one process."""
    return dist.is_available() and dist.is_initialized()


def teardown() -> None:
    if in_group():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place (nothing to do for one process)."""
    if in_group():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-d tensor `t`, as the rows of a [world_size, len(t)] tensor (one row for one process)."""
    if not in_group():
        return t[None]
    rows = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, t)
    return torch.stack(rows)


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), by rank."""
    if not in_group():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def broadcast_object(obj, src: int = 0):
    if in_group():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def rank0_first(fn):
    """fn() on rank 0 alone (the filesystem work of a run), its result broadcast to every rank. When it raises a
    UsageError or RunError, every rank raises that error (every_rank: rank 0 says it), so all ranks stop
    together for rank 0's reason."""
    outcome = None
    if not in_group() or dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except (UsageError, RunError) as e:
            e.every_rank = True
            outcome = (False, e)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def barrier() -> None:
    if in_group():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank `src`'s buffers (BatchNorm statistics): each rank's drift apart between DDP's
    broadcasts, and an evaluation must use one set, the one the checkpoint holds."""
    if not in_group() or dist.get_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for tensors in by_dtype.values():  # one broadcast per dtype, not one per buffer
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.broadcast(flat, src)
        torch._foreach_copy_(
            tensors, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
        )


def rank0_decides(value: bool, device: torch.device) -> bool:
    """Rank 0's `value` on every rank (for decisions taken from one rank's clock)."""
    if not in_group():
        return value
    t = torch.tensor([float(value)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())
