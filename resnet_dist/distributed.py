"""One distributed path, read from the environment: torchrun / accelerate, srun, or a single process."""

from __future__ import annotations

import datetime
import inspect
import os
import re
import signal
import socket
import sys
import threading
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


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


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, bracket = m.group(1), m.group(3)
    if bracket is None:
        return prefix
    return prefix + bracket.split(",")[0].split("-")[0]


# SLURM's special step ids (batch script 0xfffffffb, extern 0xfffffffc, interactive 0xfffffffa, ...) are
# no srun step. Verified on slurm 22.05: sbatch's batch shell has SLURM_PROCID and SLURM_NTASKS but no
# SLURM_STEP_ID; the bound guards any version that exports the batch step's id.
SLURM_SPECIAL_STEP = 0xFFFFFFF0


def srun_step(env=os.environ) -> bool:
    """True in a task that srun started (a job step); False in the batch shell, salloc's shell or outside SLURM."""
    step = env.get("SLURM_STEP_ID", "")
    return (
        "SLURM_PROCID" in env and "SLURM_NTASKS" in env and step.isdigit() and int(step) < SLURM_SPECIAL_STEP
    )


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed task counts per node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse SLURM task counts {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def detect(env=os.environ) -> dict:
    """Rank, local rank, world size, master address/port and launcher name from the environment."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun and accelerate launch
        launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return dict(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            local_world_size=local_world,
            launcher=launcher,
            master_addr=env.get("MASTER_ADDR"),
            master_port=env.get("MASTER_PORT"),
            # GROUP_WORLD_SIZE: torchrun's number of agents, one per node
            num_nodes=int(env.get("GROUP_WORLD_SIZE", max(1, world // max(1, local_world)))),
        )
    if srun_step(env):  # srun, one task per GPU
        job = int(env.get("SLURM_JOB_ID", "0"))
        local_rank = int(env.get("SLURM_LOCALID", 0))
        try:  # tasks of this step on this node (SLURM_NODEID counts the step's nodes)
            local_world = tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])[int(env.get("SLURM_NODEID", 0))]
        except (KeyError, ValueError, IndexError):
            local_world = local_rank + 1
        return dict(
            rank=int(env["SLURM_PROCID"]),
            local_rank=local_rank,
            world_size=int(env["SLURM_NTASKS"]),
            local_world_size=local_world,
            launcher="srun",
            # the step's first node runs rank 0 (a step may use only some of the job's nodes)
            master_addr=env.get("MASTER_ADDR")
            or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")),
            # a port derived from the job id: the tasks agree without talking, two jobs differ
            master_port=env.get("MASTER_PORT") or str(20000 + job % 20000),
            num_nodes=int(
                env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))
            ),
        )
    return dict(
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        launcher="none",
        master_addr=None,
        master_port=None,
        num_nodes=1,
    )


class LaunchError(RuntimeError):
    """A launch mistake: main() prints it as one line and exits 2, before any process group exists."""


def check_launch(info: dict, env=os.environ, gpus: int = 0) -> tuple[list[str], list[str]]:
    """(errors, warnings) about how this process was started: mistakes that would otherwise hang or mislead.

    `info` is detect(env); `gpus` the number of visible GPUs (0 on CPU).
    """
    errors, warnings = [], []
    launcher, world = info["launcher"], info["world_size"]
    in_step = srun_step(env)

    # hand-set variables: half a torchrun environment would silently train as one process (or hang)
    if launcher == "none":  # at most one of RANK / WORLD_SIZE is set
        half = [
            (k, env[k])
            for k, harmless in (("WORLD_SIZE", "1"), ("RANK", "0"))
            if env.get(k, harmless) != harmless
        ]
        if half:
            have, value = half[0]
            miss = "RANK" if have == "WORLD_SIZE" else "WORLD_SIZE"
            errors.append(
                f"{have}={value} is set but {miss} is not: start the processes with torchrun, srun or "
                "accelerate launch, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each of them"
            )
    if launcher == "none" and "MASTER_ADDR" in env and any(k.startswith("ACCELERATE_") for k in env):
        # accelerate's CPU launcher (--cpu, MULTI_CPU) sets MASTER_ADDR for N > 1 processes but, without an
        # mpirun hostfile, starts just this one
        warnings.append(
            "accelerate launch asked for several processes but started only this one (its CPU "
            "launcher needs mpirun): only one process will train; use --multi_gpu without --cpu, "
            "which starts N processes with torchrun, on CPU too (launch/accelerate_cpu.yaml)"
        )
    if (
        launcher in ("torchrun", "accelerate")
        and world > 1
        and not (info["master_addr"] and info["master_port"])
    ):
        missing = " and ".join(k for k in ("MASTER_ADDR", "MASTER_PORT") if not info[k.lower()])
        errors.append(
            f"WORLD_SIZE={world} but {missing} is not set: every process needs rank 0's address and "
            "port (torchrun, srun and accelerate launch set them)"
        )

    # one process per GPU: a task that sees one GPU uses it (clusters that bind a GPU per task); a task that
    # sees several uses the one of its local rank, so it must see at least as many as there are local processes
    needed = max(info["local_world_size"], info["local_rank"] + 1)
    if 1 < gpus < needed:
        how = {
            "srun": "sbatch/srun --ntasks-per-node at most --gpus-per-node, or --gpus-per-task=1 so that each "
            "task sees only its own GPU",
            "torchrun": "torchrun --nproc-per-node",
            "accelerate": "accelerate launch --num_processes",
        }
        errors.append(
            f"{needed} processes on this node but only {gpus} GPUs are visible to each: start at most one "
            f"process per GPU ({how.get(launcher, 'one process per GPU')})"
        )

    # torchrun vs srun inside a SLURM allocation
    if launcher in ("torchrun", "accelerate") and in_step:
        tasks = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        if tasks != info["num_nodes"]:
            errors.append(
                f"srun started {tasks} tasks that each run {launcher}, but {launcher} joined "
                f"{info['num_nodes']} agent(s): the tasks would train as separate jobs. Run one torchrun "
                "per node (srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES ..., "
                "slurm/train_torchrun.sh), or no torchrun: srun starts one task per GPU (slurm/train.sh)"
            )
    elif env.get("SLURM_JOB_ID") and not in_step:  # sbatch's batch shell or salloc's shell
        job_tasks = int(env.get("SLURM_NTASKS", "1") or 1)
        job_nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")) or 1)
        if launcher == "none" and job_tasks > 1:
            warnings.append(
                f"this SLURM job has {job_tasks} tasks but this process was not started by srun: "
                "only one process will train; start it with `srun python -m resnet_dist.train` "
                "(as slurm/train.sh does)"
            )
        elif launcher in ("torchrun", "accelerate") and job_nodes > info["num_nodes"]:
            warnings.append(
                f"this SLURM job has {job_nodes} nodes but {launcher} runs on {info['num_nodes']}: "
                "the other nodes stay idle; start one torchrun per node with "
                "`srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES ...` (slurm/train_torchrun.sh)"
            )
    return errors, warnings


def choose_backend(requested: str, device: torch.device) -> str:
    """dist.backend: auto is NCCL on GPUs and gloo on CPU; gloo also takes CUDA tensors (staged through the
    host, slower): the only backend with which several ranks can share one GPU."""
    if requested == "nccl" and device.type != "cuda":
        raise LaunchError("dist.backend=nccl needs GPUs (this process sees none): use auto or gloo")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return requested


def setup(timeout_s: int = 600, backend: str = "auto") -> DistEnv:
    """Check the launch, bind the device and create the process group (a no-op for a single process).

    Raises LaunchError (nothing created yet) for a launch mistake; DistEnv.warnings holds the milder ones.
    """
    info = detect()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    errors, warnings = check_launch(info, os.environ, gpus)
    if errors:
        raise LaunchError("; ".join(errors))
    device = device_for(info["local_rank"], gpus)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    requested, backend = backend, None
    if info["world_size"] > 1:
        backend = choose_backend(requested, device)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = info["master_addr"], str(info["master_port"])
        timeout = datetime.timedelta(seconds=timeout_s)
        store = within(timeout_s, lambda: rendezvous_store(info, timeout), info)
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
        warnings=tuple(warnings),
    )


def within(timeout_s: float, fn, info: dict):
    """fn() (joining the rendezvous store), bounded by dist.timeout_s, its failure one line (LaunchError).

    A store client that reached a program other than rank 0 on MASTER_PORT waits for an answer that never
    comes, past any timeout of its own: the call runs in a thread the process leaves behind when it gives up.
    """
    box: dict = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s + 5)
    if thread.is_alive():
        raise LaunchError(
            f"rank {info['rank']} got no answer from rank 0's rendezvous at {info['master_addr']}:"
            f"{info['master_port']} within dist.timeout_s={timeout_s:g}s: is another program holding that "
            "port (MASTER_PORT), or rank 0 stuck?"
        )
    if "error" in box:
        raise rendezvous_error(box["error"], timeout_s, info)
    return box.get("value")


def rendezvous_error(e: BaseException, timeout_s: float, info: dict) -> BaseException:
    """A one-line LaunchError for a rendezvous that failed (a busy port, ranks that never all came), else `e`."""
    text, where = str(e), f"{info['master_addr']}:{info['master_port']}"
    if "EADDRINUSE" in text or "address already in use" in text:
        return LaunchError(
            f"rank 0 cannot listen on {where}: the port is in use by another program; choose a free "
            "MASTER_PORT (torchrun --rdzv-endpoint=HOST:0 picks one)"
        )
    if "waiting for clients" in text or "connect to" in text or "timed out" in text.lower():
        first = text.strip().splitlines()[0][:200]
        return LaunchError(
            f"rank {info['rank']}: the {info['world_size']} ranks did not all meet at {where} within "
            f"dist.timeout_s={timeout_s:g}s ({first}): start every rank, with the same MASTER_ADDR/PORT"
        )
    return e


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


def exchange(store: dist.Store, key: str, rank: int, world_size: int, value: str) -> list[str]:
    """Every rank's `value`, through the rendezvous store (before any process group exists)."""
    store.set(f"{key}/{rank}", value)
    keys = [f"{key}/{r}" for r in range(world_size)]
    store.wait(keys)
    return [store.get(k).decode() for k in keys]


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
    return dist.PrefixStore(f"resnet_dist/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def in_group() -> bool:
    """Whether a process group exists (collectives run); without one, the helpers below are for one process."""
    return dist.is_available() and dist.is_initialized()


def teardown() -> None:
    if in_group():
        dist.destroy_process_group()


def explain_failure(e: BaseException, timeout_s: int) -> str | None:
    """A one-line cause for a failed collective (a peer died or hangs), or None if `e` is something else."""
    text = f"{type(e).__name__}: {e}"
    markers = (
        "Connection closed by peer",
        "Connection reset",
        "Broken pipe",
        "timed out",
        "Timeout",
        "NCCL",
        "Gloo",
        "gloo",
        "DistBackendError",
        "DistNetworkError",
        "DistStoreError",
    )
    if not (isinstance(e, getattr(dist, "DistError", ())) or any(m in text for m in markers)):
        return None
    first = text.strip().splitlines()[0][:300]
    return (
        f"a collective operation failed ({first}). Likely cause: another rank died (out of memory, killed, "
        f"crashed: see its log) or stopped responding for over dist.timeout_s={timeout_s}s"
    )


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


def rank0_first(fn, errors: tuple[type[BaseException], ...]):
    """fn() on rank 0 alone (the filesystem work of a run), its result broadcast to every rank. When it raises
    one of `errors`, every rank raises that exception, so all ranks stop together for rank 0's reason."""
    outcome = None
    if not in_group() or dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except errors as e:
            outcome = (False, e)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def barrier() -> None:
    if in_group():
        dist.barrier()


# torch 2.13 renamed broadcast_buffers to forward_sync_buffers (and warns on the old name); the new one still
# syncs buffers once at construction, which changes nothing here: every rank starts from the same state.
NO_FORWARD_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)


def wrap_ddp(model: torch.nn.Module, env: DistEnv, bucket_mb: int, compression: str):
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


class Preemption:
    """SIGTERM, SIGUSR1 and a first SIGINT (Ctrl-C) set a flag; all ranks agree to stop at the same step.
    A second SIGINT stops the process at once.

    The flag travels on the main process group, not on a second (gloo) group that would have to find its
    own network interface across nodes: each step every rank all-reduces its flag, and reads the result
    of step s at step s + lag. The host copy of the result lands in pinned memory behind a CUDA event, so
    the host waits for it only when it runs more than `lag` steps ahead of the GPU; a signal stops the
    run at most lag + 1 steps later. One process needs no agreement: the flag is read directly.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, env: DistEnv, lag: int | None = None):
        self.received = False
        self.env = env
        self.cuda = env.device.type == "cuda"
        self.lag = lag if lag is not None else (2 if self.cuda else 1)
        self.pending: deque = deque()  # (work or event, tensor holding the reduced flag), oldest first

    def install(self) -> Preemption:
        """Take over the signals (entry points call it; a benchmark or a test need not)."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:  # someone at a terminal: say what happens (os.write: safe in a handler)
            if self.received:
                os.write(2, b"interrupted twice: stopping without a checkpoint\n")
                os._exit(130)
            os.write(2, b"interrupted: saving a checkpoint at the next step (Ctrl-C again to stop at once)\n")
        self.received = True

    def agreed(self) -> bool:
        """True on every rank at the same step once any rank got a signal (call it once per step)."""
        if not self.env.distributed:
            return self.received
        flag = torch.full((1,), float(self.received), device=self.env.device)  # a host scalar: no sync
        work = dist.all_reduce(flag, async_op=True)
        if self.cuda:
            work.wait()  # the current stream waits for the all-reduce; the host does not
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.pending.append((done, host))
        else:
            self.pending.append((work, flag))
        if len(self.pending) <= self.lag:
            return False
        return self._read(*self.pending.popleft())

    @staticmethod
    def _read(waitable, flag: torch.Tensor) -> bool:
        if isinstance(waitable, torch.cuda.Event):
            waitable.synchronize()
        else:
            waitable.wait()
        return bool(flag.item() > 0)

    def drain(self) -> bool:
        """Read every agreement still in flight; True if any of them agreed to stop (the same on every rank)."""
        if not self.env.distributed:
            return self.received
        stop = False
        while self.pending:
            stop |= self._read(*self.pending.popleft())
        return stop


class NoPreemption(Preemption):
    """Signals are not ours to handle (a benchmark, a test): never stops."""

    def __init__(self):
        self.received, self.pending = False, deque()

    def agreed(self) -> bool:
        return False

    def drain(self) -> bool:
        return False


def self_test(size_mb: int = 64, iters: int = 5) -> dict:
    """A real all-reduce on this launch's backend (NCCL on GPUs, gloo on CPU), checked and timed.

    `python -m resnet_dist.distributed --self-test`, alone or under a launcher; launch/gpu_check.sh runs it first.
    """
    import time

    env = setup()
    try:
        if not dist.is_initialized():  # one process: a group of one still exercises the backend
            dist.init_process_group(
                "nccl" if env.device.type == "cuda" else "gloo",
                store=dist.HashStore(),
                rank=0,
                world_size=1,
                device_id=env.device if env.device.type == "cuda" else None,
            )
        n = size_mb * 2**20 // 4
        t = torch.full((n,), float(env.rank + 1), device=env.device)
        dist.all_reduce(t)
        want = env.world_size * (env.world_size + 1) / 2
        ok = bool(torch.all(t == want))
        sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        sync()
        secs = (time.perf_counter() - t0) / iters
        w = env.world_size
        # bus bandwidth as nccl-tests defines it: what each link carried in a ring all-reduce
        result = {
            "backend": dist.get_backend(),
            "world_size": w,
            "device": str(env.device),
            "correct": ok,
            "size_mb": size_mb,
            "ms": 1e3 * secs,
            "bus_gb_s": size_mb * 2**20 * 2 * (w - 1) / w / secs / 1e9,
        }
        if env.is_main:
            print(
                f"all_reduce self-test: backend={result['backend']} world_size={w} device={env.device} "
                f"{'correct' if ok else 'WRONG RESULT'}, {size_mb} MB in {result['ms']:.2f} ms "
                f"(bus bandwidth {result['bus_gb_s']:.1f} GB/s)",
                flush=True,
            )
        if not ok:
            raise SystemExit(1)
        return result
    finally:
        teardown()


if __name__ == "__main__":
    if sys.argv[1:] != ["--self-test"]:
        print("usage: python -m resnet_dist.distributed --self-test", file=sys.stderr)
        sys.exit(2)
    self_test()
