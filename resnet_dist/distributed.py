"""One distributed path, read from the environment: torchrun / accelerate, srun, or a single process."""

from __future__ import annotations

import datetime
import inspect
import os
import re
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .errors import RunError, UsageError, first_line


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


class LaunchError(UsageError):
    """A launch mistake: main() prints it as one line (cli.report) and exits 2, before any process
    group exists."""


def env_int(env, name: str, default: int | None = None, low: int = 0, high: int | None = None) -> int:
    """The whole number in launcher variable `name` (`default` when unset), within [low, high]; a LaunchError
    naming the variable otherwise. Every launcher variable is read through here."""
    if name not in env and default is not None:
        return default
    text = env.get(name, "")
    value = int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else None
    if value is None or value < low or (high is not None and value > high):
        want = f"a whole number from {low} to {high}" if high is not None else f"a whole number >= {low}"
        raise LaunchError(
            f"launcher variable {name}={text!r} is not {want}: the launcher (torchrun, srun, accelerate "
            "launch) sets it; unset it or fix its value"
        )
    return value


def first_env_int(env, names: tuple[str, ...], default: int, low: int = 0) -> int:
    """The first of `names` that is set (each parsed with env_int), else `default`."""
    for name in names:
        if name in env:
            return env_int(env, name, low=low)
    return default


def below(name: str, value: int, limit_name: str, limit: int) -> None:
    """A rank must be below its count (RANK < WORLD_SIZE): else every process would wait for one that never
    comes, for dist.timeout_s."""
    if value >= limit:
        raise LaunchError(
            f"{name}={value} is not below {limit_name}={limit}: the {limit} processes have {name} 0 to "
            f"{limit - 1}; start them with torchrun, srun or accelerate launch, or fix the hand-set variables"
        )


def detect(env=os.environ) -> dict:
    """Rank, local rank, world size, master address/port and launcher name from the environment.

    Raises LaunchError (one line naming the variable) for a variable that is not a whole number or out of range.
    """
    # torchrun's attempt number (the rendezvous prefix, the run directory of a restart): parsed wherever it is set
    restart = env_int(env, "TORCHELASTIC_RESTART_COUNT", 0)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun and accelerate launch
        launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
        world = env_int(env, "WORLD_SIZE", low=1)
        rank = env_int(env, "RANK")
        below("RANK", rank, "WORLD_SIZE", world)
        local_world = env_int(env, "LOCAL_WORLD_SIZE", world, low=1)
        local_rank = env_int(env, "LOCAL_RANK", 0)
        below(
            "LOCAL_RANK",
            local_rank,
            "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "WORLD_SIZE",
            local_world,
        )
        return dict(
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            local_world_size=local_world,
            launcher=launcher,
            master_addr=env.get("MASTER_ADDR"),
            master_addr_from="MASTER_ADDR",
            # read only where it is used: one process never connects anywhere
            master_port=str(env_int(env, "MASTER_PORT", low=1, high=65535))
            if world > 1 and "MASTER_PORT" in env
            else env.get("MASTER_PORT"),
            # GROUP_WORLD_SIZE: torchrun's number of agents, one per node
            num_nodes=env_int(env, "GROUP_WORLD_SIZE", max(1, world // local_world), low=1),
            restart=restart,
        )
    if srun_step(env):  # srun, one task per GPU
        job = env_int(env, "SLURM_JOB_ID", 0)
        world = env_int(env, "SLURM_NTASKS", low=1)
        rank = env_int(env, "SLURM_PROCID")
        below("SLURM_PROCID", rank, "SLURM_NTASKS", world)
        local_rank = env_int(env, "SLURM_LOCALID", 0)
        node = env_int(env, "SLURM_NODEID", 0)
        try:  # tasks of this step on this node (SLURM_NODEID counts the step's nodes)
            counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
        except ValueError:
            if "SLURM_STEP_TASKS_PER_NODE" in env:
                raise LaunchError(
                    f"launcher variable SLURM_STEP_TASKS_PER_NODE={env['SLURM_STEP_TASKS_PER_NODE']!r} is not "
                    "SLURM's list of task counts (like '2(x3),1'): srun sets it; unset it or fix its value"
                ) from None
            counts = []
        local_world = counts[node] if node < len(counts) else local_rank + 1
        nodelist_var = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
        if env.get("MASTER_ADDR"):
            master_addr, master_from = env["MASTER_ADDR"], "MASTER_ADDR"
        else:  # the step's first node runs rank 0 (a step may use only some of the job's nodes)
            try:
                master_addr, master_from = first_host(env.get(nodelist_var, "localhost")), nodelist_var
            except ValueError:
                raise LaunchError(
                    f"launcher variable {nodelist_var}={env[nodelist_var]!r} is not a SLURM node list: srun "
                    "sets it; unset it or fix its value"
                ) from None
        return dict(
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            local_world_size=local_world,
            launcher="srun",
            master_addr=master_addr,
            master_addr_from=master_from,
            # a port derived from the job id: the tasks agree without talking, two jobs differ
            master_port=str(env_int(env, "MASTER_PORT", low=1, high=65535))
            if env.get("MASTER_PORT")
            else str(20000 + job % 20000),
            num_nodes=first_env_int(
                env, ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"), 1, 1
            ),
            restart=restart,
        )
    return dict(
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        launcher="none",
        master_addr=None,
        master_addr_from=None,
        master_port=None,
        num_nodes=1,
        restart=restart,
    )


def half_environment(env) -> list[str]:
    """Errors for a launcher's variables set without the rest, in a process that no launcher claims (detect()
    found none): it would train alone, with no word, while the user meant several processes.

    Half a torchrun environment: RANK without WORLD_SIZE, or the other way round. Half a SLURM one:
    - in a job step (a SLURM_STEP_ID below SLURM's special ids), SLURM_PROCID or SLURM_NTASKS missing: srun
      sets both in every task;
    - outside any job (no SLURM_JOB_ID), SLURM_PROCID or SLURM_NTASKS set, by hand, without the step id and
      the other one that would make the process an srun task.
    Not half: sbatch's batch shell and salloc's shell (a SLURM_JOB_ID, no step id or a special one) have
    SLURM_PROCID=0 and (with --ntasks) SLURM_NTASKS by design; check_launch warns there when the job has
    several tasks. As for torchrun, leftovers that ask for one process (RANK=0, WORLD_SIZE=1,
    SLURM_PROCID=0, SLURM_NTASKS=1) are harmless: the process trains alone, as asked."""
    one = {"RANK": "0", "WORLD_SIZE": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}

    def asks(*names):  # those of `names` set to more than one process
        return [k for k in names if env.get(k, one[k]) != one[k]]

    halves = [(asks("RANK", "WORLD_SIZE"), ("RANK", "WORLD_SIZE"))]
    step = env.get("SLURM_STEP_ID", "")
    if step.isdigit() and int(step) < SLURM_SPECIAL_STEP:  # looks like an srun task
        halves.append(
            (
                ["SLURM_STEP_ID", *(k for k in ("SLURM_PROCID", "SLURM_NTASKS") if k in env)],
                ("SLURM_PROCID", "SLURM_NTASKS"),
            )
        )
    elif "SLURM_JOB_ID" not in env:
        halves.append(
            (asks("SLURM_PROCID", "SLURM_NTASKS"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"))
        )
    errors = []
    for have, needed in halves:
        missing = [k for k in needed if k not in env]
        if have and missing:
            errors.append(
                f"{' and '.join(f'{k}={env[k]}' for k in have)} {'is' if len(have) == 1 else 'are'} set but "
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start the processes with "
                "torchrun, srun or accelerate launch, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in "
                "each of them"
            )
    return errors


def _launch_ranks(env) -> tuple[str, str] | None:
    """The variables of rank and local rank where a launcher started the processes together and stops them
    all when one fails (torchrun and accelerate launch set TORCHELASTIC_RUN_ID; srun: a job step, and
    slurm/train.sh runs srun --kill-on-bad-exit); None for a process started alone or by hand."""
    if "TORCHELASTIC_RUN_ID" in env:
        return "RANK", "LOCAL_RANK"
    if srun_step(env):
        return "SLURM_PROCID", "SLURM_LOCALID"
    return None


def speaks(per_node: bool = False, env=os.environ) -> bool:
    """Whether this process prints the one line of a usage error that every process of a launch hits alike.

    Under a launcher, one says it and the others exit 2 quietly: rank 0 for a mistake in the command line or
    config (the same on every rank); with `per_node`, for a launch error, the first process of each node
    (local rank 0), since that comes from the node's own variables, GPUs and name lookups, which rank 0 does
    not see. A rank that cannot be read falls back to the local rank, then to every process; processes
    started by hand (each in a terminal of its own) all speak."""
    names = _launch_ranks(env)
    for name in (names or ())[per_node:]:
        try:
            return env_int(env, name) == 0
        except LaunchError:
            continue
    return True


# how long a quiet process waits for the launcher to stop it (wait_for_launcher)
QUIET_WAIT_S = 20.0


def wait_for_launcher(env=os.environ) -> None:
    """Called by a process that leaves its error to rank 0, before it exits. torchrun (and srun
    --kill-on-bad-exit) stop every process as soon as one exits: a quiet rank that exited first could have
    rank 0 stopped before it prints. So wait, up to QUIET_WAIT_S, for the launcher to stop this process
    (SIGTERM) once rank 0 has said it and exited; its summary then names rank 0 as the root cause."""
    if _launch_ranks(env) is None:
        return
    try:
        time.sleep(QUIET_WAIT_S)
    except KeyboardInterrupt:  # Ctrl-C to the launcher, forwarded: nothing to add
        pass


def check_launch(info: dict, env=os.environ, gpus: int = 0) -> tuple[list[str], list[str]]:
    """(errors, warnings) about how this process was started: mistakes that would otherwise hang or mislead.

    `info` is detect(env); `gpus` the number of visible GPUs (0 on CPU).
    """
    errors, warnings = [], []
    launcher, world = info["launcher"], info["world_size"]
    in_step = srun_step(env)

    # hand-set variables: half a launcher's environment would silently train as one process (or hang)
    if launcher == "none":
        errors += half_environment(env)
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
        tasks = env_int(env, "SLURM_STEP_NUM_TASKS", env_int(env, "SLURM_NTASKS"))
        if tasks != info["num_nodes"]:
            errors.append(
                f"srun started {tasks} tasks that each run {launcher}, but {launcher} joined "
                f"{info['num_nodes']} agent(s): the tasks would train as separate jobs. Run one torchrun "
                "per node (srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES ..., "
                "slurm/train_torchrun.sh), or no torchrun: srun starts one task per GPU (slurm/train.sh)"
            )
    elif env.get("SLURM_JOB_ID") and not in_step:  # sbatch's batch shell or salloc's shell
        job_tasks = env_int(env, "SLURM_NTASKS", 1)
        job_nodes = first_env_int(env, ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"), 1)
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
        check_address(info)
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


def check_address(info: dict) -> None:
    """A LaunchError when rank 0's address does not resolve here: the store client would retry it for the
    whole dist.timeout_s. The system resolver answers (or fails) within seconds; an IP address needs no lookup."""
    host = info["master_addr"]
    try:
        socket.getaddrinfo(host, int(info["master_port"]), type=socket.SOCK_STREAM)
    except (
        OSError,
        UnicodeError,
    ) as e:  # gaierror; a name that is no host name at all ('a..b') is UnicodeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        source = (
            ""
            if info["master_addr_from"] == "MASTER_ADDR"
            else f", the first host of {info['master_addr_from']},"
        )
        raise LaunchError(
            f"MASTER_ADDR={host!r}{source} does not resolve on this host ({why}): every process needs rank 0's "
            "host name or IP address; check the name, or give rank 0's IP address"
        ) from None


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
        first = first_line(e)
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
    return dist.PrefixStore(f"resnet_dist/attempt_{info['restart']}", store)


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
    first = f"{type(e).__name__}: {first_line(e)}"
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
    own network interface across nodes: every `every` steps each rank all-reduces its flag, and reads the
    result of one agreement at the next `lag`-th one. On GPUs the host copy lands in pinned memory behind a
    CUDA event (a few slots, allocated once), so the host waits for it only when it runs that far ahead of the
    GPU, and no collective runs in most steps (a captured step replays between them). A signal stops the run
    at most every x (lag + 1) steps later: 30 on GPUs (a fraction of a second), 2 on CPU, where steps are long
    and one tiny all-reduce a step costs nothing. One process needs no agreement: the flag is read directly.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, env: DistEnv, lag: int | None = None, every: int | None = None):
        self.received = False
        self.env = env
        self.cuda = env.device.type == "cuda"
        self.lag = lag if lag is not None else (2 if self.cuda else 1)
        self.every = every if every is not None else (10 if self.cuda else 1)
        self.pending: deque = deque()  # (work or event, tensor holding the reduced flag), oldest first
        self.slots = []  # on GPUs: (device flag, pinned host copy, event) for each agreement in flight
        if self.cuda and env.distributed:
            self.slots = [
                (torch.zeros(1, device=env.device), torch.empty(1, pin_memory=True), torch.cuda.Event())
                for _ in range(self.lag + 1)
            ]
        self.count = 0  # agreements started

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

    def agreed(self, step: int) -> bool:
        """True on every rank at the same step once any rank got a signal (call it after every step, with the
        global step count: all ranks agree at the same steps)."""
        if not self.env.distributed:
            return self.received
        if step % self.every:
            return False
        if self.cuda:
            flag, host, done = self.slots[self.count % len(self.slots)]
            flag.fill_(float(self.received))  # a kernel with the host's value: no sync
            dist.all_reduce(flag, async_op=True).wait()  # the current stream waits for it; the host does not
            host.copy_(flag, non_blocking=True)
            done.record()
            self.pending.append((done, host))
        else:
            flag = torch.full((1,), float(self.received))
            self.pending.append((dist.all_reduce(flag, async_op=True), flag))
        self.count += 1
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

    def agreed(self, step: int) -> bool:
        return False

    def drain(self) -> bool:
        return False
