"""Launch mistakes caught before the rendezvous, and one-line diagnostics for what goes wrong around it: a
half-set launcher environment, more processes than GPUs, srun tasks that each run torchrun, an address that does
not resolve (each of which would otherwise hang or mislead); who of many processes says a usage error; what a
failed collective most likely means. It imports distributed.py, never the reverse: the entry points call
`start()` instead of distributed.setup()."""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import torch
import torch.distributed as dist

from . import distributed
from .errors import first_line
from .launchenv import SLURM_SPECIAL_STEP, LaunchError, detect, env_int, first_env_int, srun_step


def start(timeout_s: int = 600, backend: str = "auto", deterministic: bool = False) -> distributed.DistEnv:
    """The launch checks, then distributed.setup(): LaunchError (exit 2, nothing created) for a mistake;
    DistEnv.warnings holds the milder ones (rank 0 says them)."""
    info = detect()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    errors, warnings = check_launch(info, os.environ, gpus)
    if errors:
        raise LaunchError("; ".join(errors))
    if info["world_size"] > 1:
        check_address(info)
    env = distributed.setup(info, gpus, timeout_s, backend, deterministic)
    return dataclasses.replace(env, warnings=tuple(warnings))


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
