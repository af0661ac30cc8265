"""Launchers and launch mistakes: the preflight checks on environments, and the real launchers on CPU.

The SLURM side (sbatch, srun, requeue, torchrun inside an allocation) is in test_slurm.py.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from resnet_dist import distributed, train

from .helpers import PY, REPO, clean_env, epochs, free_port, read_metrics, run, small_run

TINY = ("data.train_subset=256", "train.epochs=1", "log.every_steps=2")  # after small_run's: these win


def problems(env: dict, gpus: int = 0):
    return distributed.check_launch(distributed.detect(env), env, gpus)


# ---- the environment of each launcher, and of each mistake --------------------------------------
SRUN = {
    "SLURM_JOB_ID": "7",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "n[1-2]",
}
TORCHRUN = {
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "none",
}
BATCH_SHELL = {
    "SLURM_JOB_ID": "7",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "n[1-2]",
}  # what sbatch's shell has (slurm 22.05, checked in test_slurm.py)


def test_tasks_per_node():
    assert distributed.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert distributed.tasks_per_node("4") == [4]


def test_srun_local_world_size_from_the_step():
    d = distributed.detect(SRUN)
    assert (d["launcher"], d["rank"], d["local_rank"], d["local_world_size"], d["num_nodes"]) == (
        "srun",
        3,
        1,
        2,
        2,
    )
    assert problems(SRUN) == ([], [])


def test_srun_master_is_the_steps_first_node():
    # a step on the job's second node only: rank 0 runs there
    step = {**SRUN, "SLURM_STEP_NODELIST": "n2", "SLURM_STEP_NUM_NODES": "1", "SLURM_NODEID": "0"}
    assert distributed.detect(step)["master_addr"] == "n2"


def test_special_step_ids_are_not_srun():
    # the batch script's own step (0xfffffffb) and the interactive step are no srun step
    for step in ("4294967291", "4294967290"):
        assert distributed.detect({**BATCH_SHELL, "SLURM_STEP_ID": step})["launcher"] == "none"


FOUR_LOCAL = {**TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}


@pytest.mark.parametrize(
    "env, gpus, ok",
    [
        (SRUN, 2, True),
        (SRUN, 1, True),  # 2 tasks on this node; one GPU each (--gpus-per-task=1) is fine
        (TORCHRUN, 2, True),
        (TORCHRUN, 1, True),  # 2 local processes
        (FOUR_LOCAL, 4, True),
        (FOUR_LOCAL, 2, False),
        (FOUR_LOCAL, 3, False),
        (FOUR_LOCAL, 1, True),
        (TORCHRUN, 0, True),  # CPU: any number of processes
    ],
)
def test_more_local_processes_than_gpus(env, gpus, ok):
    errors, _ = problems(env, gpus)
    assert (errors == []) == ok
    if not ok:
        assert len(errors) == 1 and f"4 processes on this node but only {gpus} GPUs are visible" in errors[0]


@pytest.mark.parametrize(
    "local_rank, gpus, want",
    [(0, 0, "cpu"), (3, 0, "cpu"), (3, 1, "cuda:0"), (0, 1, "cuda:0"), (2, 4, "cuda:2"), (0, 8, "cuda:0")],
)
def test_device_of_each_process(local_rank, gpus, want):
    assert str(distributed.device_for(local_rank, gpus)) == want


@pytest.mark.parametrize(
    "requested, device, want",
    [("auto", "cpu", "gloo"), ("auto", "cuda", "nccl"), ("gloo", "cuda", "gloo"), ("nccl", "cuda", "nccl")],
)
def test_backend_choice(requested, device, want):
    """dist.backend=gloo on GPUs: the backend that lets ranks share one GPU (NCCL refuses that)."""
    assert distributed.choose_backend(requested, torch.device(device)) == want
    with pytest.raises(distributed.LaunchError, match="dist.backend=nccl needs GPUs"):
        distributed.choose_backend("nccl", torch.device("cpu"))


def test_processes_that_see_the_same_single_gpu_are_refused():
    """One visible GPU per task is fine when each task sees its own, not when they all see the same one."""
    import threading

    store = torch.distributed.HashStore()
    idents = ["n1 GPU-a", "n1 GPU-b", "n2 GPU-a", "n2 GPU-a"]
    got = {}
    threads = [
        threading.Thread(
            target=lambda r: got.__setitem__(r, distributed.exchange(store, "gpu", r, 4, idents[r])),
            args=(r,),
        )
        for r in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {r: idents for r in range(4)}  # every rank sees every rank's identity
    assert distributed.shared_gpu(idents[:3]) is None  # the same UUID on two hosts is two GPUs
    clash = distributed.shared_gpu(idents)
    assert "ranks 2 and 3 both see only GPU GPU-a on n2" in clash and "--gpus-per-task=1" in clash


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "WORLD_SIZE=2 but MASTER_PORT is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT is not set"),
    ],
)
def test_hand_set_world_size_without_the_rest(env, message):
    errors, _ = problems(env)
    assert len(errors) == 1 and message in errors[0]


def test_harmless_leftovers_are_fine():
    assert problems({"WORLD_SIZE": "1"}) == ([], [])
    assert problems({"RANK": "0"}) == ([], [])


def test_srun_tasks_that_each_run_torchrun():
    # srun -n 4 torchrun --standalone: four separate jobs of one agent each
    errors, _ = problems({**SRUN, **TORCHRUN})
    assert len(errors) == 1 and "srun started 4 tasks that each run torchrun" in errors[0]
    # slurm/train_torchrun.sh: one agent per node, the agents form one job
    per_node = {
        **SRUN,
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        **TORCHRUN,
        "GROUP_WORLD_SIZE": "2",
        "WORLD_SIZE": "4",
    }
    assert problems(per_node) == ([], [])


def test_python_in_the_batch_script_without_srun_warns():
    errors, warnings = problems(BATCH_SHELL)
    assert errors == [] and len(warnings) == 1 and "only one process will train" in warnings[0]
    assert problems({**BATCH_SHELL, "SLURM_NTASKS": "1"}) == ([], [])


def test_torchrun_in_the_batch_script_of_a_multi_node_job_warns():
    errors, warnings = problems({**BATCH_SHELL, **TORCHRUN})
    assert errors == [] and len(warnings) == 1 and "2 nodes but torchrun runs on 1" in warnings[0]


def test_accelerate_cpu_launcher_starting_one_process_warns():
    env = {
        "ACCELERATE_USE_CPU": "True",
        "ACCELERATE_MIXED_PRECISION": "no",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    errors, warnings = problems(env)
    assert errors == [] and len(warnings) == 1 and "started only this one" in warnings[0]


# ---- how a mistake surfaces: one line, exit 2, nothing created ----------------------------------
def test_more_tasks_than_gpus_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    # a node with 2 GPUs and 4 local processes, without a GPU: the check runs before CUDA is touched
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for k in os.environ.keys() - clean_env().keys():  # no launcher variables of our own
        monkeypatch.delenv(k)
    for k, v in FOUR_LOCAL.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        train.main([f"run.dir={tmp_path}", "run.name=x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 4 processes on this node but only 2 GPUs")
    assert not (tmp_path / "x").exists()


def test_world_size_without_master_exits_2_at_once(tmp_path):
    proc = run(
        [PY, "-m", "resnet_dist.train", f"run.dir={tmp_path}", "run.name=x"],
        timeout=60,
        RANK="0",
        WORLD_SIZE="2",
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT is not set: every process needs rank 0's address "
        "and port (torchrun, srun and accelerate launch set them)"
    ]
    assert not (tmp_path / "x").exists()


# ---- the launchers, for real, on CPU ------------------------------------------------------------
def test_launch_torchrun_sh_two_cpu_processes(tmp_path, data_root):
    env = {"NPROC": "", "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible: 2 CPU processes
    proc = run(["bash", "launch/torchrun.sh", *small_run(data_root, tmp_path, "tr", *TINY)], **env)
    assert proc.returncode == 0, proc.stderr
    assert "resnet_dist: launcher=torchrun world_size=2 nodes=1 backend=gloo" in proc.stdout
    ep = epochs(read_metrics(tmp_path / "tr"))
    assert [(r["epoch"], r["world_size"], r["test/samples"]) for r in ep] == [(0, 2, 999)]


def test_two_torchrun_agents_form_one_job(tmp_path, data_root):
    """Two "nodes" on this machine: agents with node ranks 0 and 1, one process each, static rendezvous."""
    port = free_port()
    cmd = [
        "bash",
        "launch/torchrun_multinode.sh",
        "--nnodes",
        "2",
        "--rdzv",
        f"127.0.0.1:{port}",
        "--nproc",
        "1",
    ]
    args = small_run(data_root, tmp_path, "mn", *TINY)
    agents = [
        subprocess.Popen(
            cmd + ["--node-rank", str(r)] + args,
            cwd=REPO,
            env=clean_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in (0, 1)
    ]
    outs = [a.communicate(timeout=240) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs
    # each agent ran one process (LOCAL_RANK 0); only the one on node 0 is rank 0 and speaks
    assert "resnet_dist: launcher=torchrun world_size=2 nodes=2 backend=gloo" in outs[0][0]
    assert "resnet_dist:" not in outs[1][0] and "finished" not in outs[1][0]
    ep = epochs(read_metrics(tmp_path / "mn"))
    assert [(r["world_size"], r["test/samples"]) for r in ep] == [(2, 999)]


def test_accelerate_launch_on_cpu_follows_mixed_precision(tmp_path, data_root):
    # --multi_gpu starts the processes with torchrun, also without GPUs (--cpu would start only one)
    accelerate = [
        PY,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        "0",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        "-m",
        "resnet_dist.train",
    ]
    # bf16 backward on CPUs without native bf16 costs ~0.5 s per image: one step of 64 images
    proc = run(
        accelerate
        + small_run(data_root, tmp_path, "acc", *TINY, "data.train_subset=64", "data.test_subset=100")
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "resnet_dist: launcher=accelerate world_size=2 nodes=1 backend=gloo device=cpu precision=bf16"
        in proc.stdout
    )
    ep = epochs(read_metrics(tmp_path / "acc"))
    assert [(r["world_size"], r["test/samples"]) for r in ep] == [(2, 100)]


@pytest.mark.parametrize(
    "name, processes, precision", [("accelerate_cpu.yaml", 2, "no"), ("accelerate_gpu.yaml", 4, "bf16")]
)
def test_accelerate_config_files_load(name, processes, precision):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "launch" / name))
    assert (cfg.distributed_type, cfg.num_processes, cfg.mixed_precision, cfg.use_cpu) == (
        "MULTI_GPU",
        processes,
        precision,
        False,
    )


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun starts its workers in sessions of their own)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def test_losing_a_node_keeps_the_run(tmp_path, data_root):
    """Elastic: two agents (torchrun --nnodes=1:2 --max-restarts=3, c10d rendezvous), one process each. The
    second agent and its worker are SIGKILLed mid-epoch: the first agent's worker restarts alone, resumes from
    the newest checkpoint at world size 1 with the same global batch, and finishes; nothing logged twice."""
    port = free_port()
    cmd = ["bash", "launch/torchrun_multinode.sh", "--nnodes", "1:2", "--rdzv", f"127.0.0.1:{port}"]
    cmd += ["--nproc", "1", "--max-restarts", "3", "--rdzv-conf"]
    args = small_run(
        data_root, tmp_path, "el", "checkpoint.every_steps=2", "log.every_steps=1", "data.test_subset=200"
    )
    # the rendezvous store lives in the agent that hosts it, so that agent must be the survivor: say which
    # (both agents are on 127.0.0.1, where torchrun would otherwise let whichever starts first host it)
    out = subprocess.PIPE
    host_cmd = [*cmd, "last_call_timeout=5,is_host=true", *args]
    host = subprocess.Popen(host_cmd, cwd=REPO, env=clean_env(), text=True, stdout=out, stderr=out)
    node = subprocess.Popen(
        [*cmd, "last_call_timeout=5,is_host=false", *args],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # bash execs torchrun: node.pid is the agent
    ckpt = tmp_path / "el" / "checkpoints" / "step-00000010.pt"  # in epoch 1, after epoch 0 on 2 ranks
    deadline = time.time() + 180
    while not ckpt.exists():
        assert host.poll() is None and node.poll() is None and time.time() < deadline, host.communicate()
        time.sleep(0.05)
    for pid in [node.pid, *children(node.pid)]:  # the node is gone: its agent and its worker
        os.kill(pid, signal.SIGKILL)
    node.wait()
    _, err = host.communicate(timeout=300)
    assert host.returncode == 0, err[-3000:]
    records = read_metrics(tmp_path / "el")
    ep = epochs(records)
    assert [(r["epoch"], r["world_size"]) for r in ep] == [(0, 2), (1, 1)]  # the same global batch on 1 rank
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == list(range(1, 17))  # 8 steps per epoch at any world size; nothing twice, nothing lost
