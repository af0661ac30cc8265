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
    return "SLURM_PROCID" in env and "SLURM_NTASKS" in env and step.isdigit() and int(step) < SLURM_SPECIAL_STEP


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
        return dict(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)), world_size=world,
                    local_world_size=local_world, launcher=launcher,
                    master_addr=env.get("MASTER_ADDR"), master_port=env.get("MASTER_PORT"),
                    # GROUP_WORLD_SIZE: torchrun's number of agents, one per node
                    num_nodes=int(env.get("GROUP_WORLD_SIZE", max(1, world // max(1, local_world)))))
    if srun_step(env):  # srun, one task per GPU
        job = int(env.get("SLURM_JOB_ID", "0"))
        local_rank = int(env.get("SLURM_LOCALID", 0))
        try:  # tasks of this step on this node (SLURM_NODEID counts the step's nodes)
            local_world = tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])[int(env.get("SLURM_NODEID", 0))]
        except (KeyError, ValueError, IndexError):
            local_world = local_rank + 1
        return dict(rank=int(env["SLURM_PROCID"]), local_rank=local_rank,
                    world_size=int(env["SLURM_NTASKS"]), local_world_size=local_world, launcher="srun",
                    # the step's first node runs rank 0 (a step may use only some of the job's nodes)
                    master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST")
                                                                     or env.get("SLURM_JOB_NODELIST", "localhost")),
                    # a port derived from the job id: the tasks agree without talking, two jobs differ
                    master_port=env.get("MASTER_PORT") or str(20000 + job % 20000),
                    num_nodes=int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_JOB_NUM_NODES",
                                                                         env.get("SLURM_NNODES", 1)))))
    return dict(rank=0, local_rank=0, world_size=1, local_world_size=1, launcher="none", master_addr=None,
                master_port=None, num_nodes=1)


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
        half = [(k, env[k]) for k, harmless in (("WORLD_SIZE", "1"), ("RANK", "0")) if env.get(k, harmless) != harmless]
        if half:
            have, value = half[0]
            miss = "RANK" if have == "WORLD_SIZE" else "WORLD_SIZE"
            errors.append(f"{have}={value} is set but {miss} is not: start the processes with torchrun, srun or "
                          "accelerate launch, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each of them")
    if launcher == "none" and "MASTER_ADDR" in env and any(k.startswith("ACCELERATE_") for k in env):
        # accelerate's CPU launcher (--cpu, MULTI_CPU) sets MASTER_ADDR for N > 1 processes but, without an
        # mpirun hostfile, starts just this one
        warnings.append("accelerate launch asked for several processes but started only this one (its CPU "
                        "launcher needs mpirun): only one process will train; use --multi_gpu without --cpu, "
                        "which starts N processes with torchrun, on CPU too (launch/accelerate_cpu.yaml)")
    if launcher in ("torchrun", "accelerate") and world > 1 and not (info["master_addr"] and info["master_port"]):
        missing = " and ".join(k for k in ("MASTER_ADDR", "MASTER_PORT") if not info[k.lower()])
        errors.append(f"WORLD_SIZE={world} but {missing} is not set: every process needs rank 0's address and "
                      "port (torchrun, srun and accelerate launch set them)")

    # one process per GPU
    if gpus > 0 and max(info["local_world_size"], info["local_rank"] + 1) > gpus:
        how = {"srun": "sbatch/srun --ntasks-per-node at most --gpus-per-node; each task must see all of its "
                       "node's GPUs, so no --gpus-per-task / --gpu-bind",
               "torchrun": "torchrun --nproc-per-node", "accelerate": "accelerate launch --num_processes"}
        errors.append(f"{max(info['local_world_size'], info['local_rank'] + 1)} processes on this node but only "
                      f"{gpus} GPU(s) are visible: start at most one process per GPU "
                      f"({how.get(launcher, 'one process per GPU')})")

    # torchrun vs srun inside a SLURM allocation
    if launcher in ("torchrun", "accelerate") and in_step:
        tasks = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        if tasks != info["num_nodes"]:
            errors.append(f"srun started {tasks} tasks that each run {launcher}, but {launcher} joined "
                          f"{info['num_nodes']} agent(s): the tasks would train as separate jobs. Run one torchrun "
                          "per node (srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES ..., "
                          "slurm/train_torchrun.sh), or no torchrun: srun starts one task per GPU (slurm/train.sh)")
    elif env.get("SLURM_JOB_ID") and not in_step:  # sbatch's batch shell or salloc's shell
        job_tasks = int(env.get("SLURM_NTASKS", "1") or 1)
        job_nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")) or 1)
        if launcher == "none" and job_tasks > 1:
            warnings.append(f"this SLURM job has {job_tasks} tasks but this process was not started by srun: "
                            "only one process will train; start it with `srun python -m resnet_dist.train` "
                            "(as slurm/train.sh does)")
        elif launcher in ("torchrun", "accelerate") and job_nodes > info["num_nodes"]:
            warnings.append(f"this SLURM job has {job_nodes} nodes but {launcher} runs on {info['num_nodes']}: "
                            "the other nodes stay idle; start one torchrun per node with "
                            "`srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES ...` (slurm/train_torchrun.sh)")
    return errors, warnings


def setup(timeout_s: int = 600) -> DistEnv:
    """Check the launch, bind the device and create the process group (a no-op for a single process).

    Raises LaunchError (nothing created yet) for a launch mistake; DistEnv.warnings holds the milder ones.
    """
    info = detect()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    errors, warnings = check_launch(info, os.environ, gpus)
    if errors:
        raise LaunchError("; ".join(errors))
    if gpus:
        device = torch.device("cuda", info["local_rank"])
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if info["world_size"] == 1:
        backend = None
    else:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = info["master_addr"], str(info["master_port"])
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, store=rendezvous_store(info, timeout), rank=info["rank"],
                                world_size=info["world_size"], timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    return DistEnv(rank=info["rank"], local_rank=info["local_rank"], world_size=info["world_size"],
                   launcher=info["launcher"], device=device, backend=backend, num_nodes=info["num_nodes"],
                   warnings=tuple(warnings))


def rendezvous_store(info: dict, timeout: datetime.timedelta, env=os.environ) -> dist.Store:
    """The key-value store the ranks meet in, with a prefix per torchrun restart.

    torchrun's agent keeps one store across restarts: without the prefix, a restarted rank 0 reads the
    dead attempt's addresses and fails to connect ("Connection refused").
    """
    agent_hosts = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves the store
    store = dist.TCPStore(info["master_addr"], int(info["master_port"]), info["world_size"],
                          is_master=info["rank"] == 0 and not agent_hosts, timeout=timeout)
    return dist.PrefixStore(f"resnet_dist/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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


def self_test(size_mb: int = 64, iters: int = 5) -> dict:
    """A real all-reduce on this launch's backend (NCCL on GPUs, gloo on CPU), checked and timed.

    `python -m resnet_dist.distributed --self-test`, alone or under a launcher; launch/gpu_check.sh runs it first.
    """
    import time
    env = setup()
    try:
        if not dist.is_initialized():  # one process: a group of one still exercises the backend
            dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1, device_id=env.device if env.device.type == "cuda" else None)
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
        result = {"backend": dist.get_backend(), "world_size": w, "device": str(env.device), "correct": ok,
                  "size_mb": size_mb, "ms": 1e3 * secs, "bus_gb_s": size_mb * 2**20 * 2 * (w - 1) / w / secs / 1e9}
        if env.is_main:
            print(f"all_reduce self-test: backend={result['backend']} world_size={w} device={env.device} "
                  f"{'correct' if ok else 'WRONG RESULT'}, {size_mb} MB in {result['ms']:.2f} ms "
                  f"(bus bandwidth {result['bus_gb_s']:.1f} GB/s)", flush=True)
        if not ok:
            raise SystemExit(1)
        return result
    finally:
        teardown()


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["--self-test"]:
        print("usage: python -m resnet_dist.distributed --self-test", file=sys.stderr)
        sys.exit(2)
    self_test()
