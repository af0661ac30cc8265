"""What the launcher says: rank, world size, master address and which launcher (torchrun / accelerate, srun,
or none), read from its environment variables, each parsed with a one-line error naming it (LaunchError)."""

from __future__ import annotations

import os
import re

from .errors import UsageError


class LaunchError(UsageError):
    """A launch mistake: the entry point prints it as one line and exits 2, before any process group exists."""


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
