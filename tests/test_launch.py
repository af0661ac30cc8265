"""Launchers and launch mistakes: the preflight checks on environments, and the real launchers on CPU.

The SLURM side (sbatch, srun, requeue, torchrun inside an allocation) is in test_slurm.py.
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from resnet_dist import distributed, launchcheck, launchenv, selftest, train
from resnet_dist.device import device_for, shared_gpu

from .held import marker
from .helpers import (
    PY,
    REPO,
    call,
    clean_env,
    epochs,
    exit_code,
    free_port,
    hold,
    read_metrics,
    run,
    small_run,
    torchrun,
    wait_for,
)

TINY = ("data.train_subset=256", "train.epochs=1", "log.every_steps=2")  # after small_run's: these win


def problems(env: dict, gpus: int = 0):
    return launchcheck.check_launch(launchenv.detect(env), env, gpus)


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
    assert launchenv.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert launchenv.tasks_per_node("4") == [4]


def test_srun_local_world_size_from_the_step():
    d = launchenv.detect(SRUN)
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
    assert launchenv.detect(step)["master_addr"] == "n2"


def test_special_step_ids_are_not_srun():
    # the batch script's own step (0xfffffffb) and the interactive step are no srun step
    for step in ("4294967291", "4294967290"):
        assert launchenv.detect({**BATCH_SHELL, "SLURM_STEP_ID": step})["launcher"] == "none"


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
    assert str(device_for(local_rank, gpus)) == want


@pytest.mark.parametrize(
    "requested, device, want",
    [("auto", "cpu", "gloo"), ("auto", "cuda", "nccl"), ("gloo", "cuda", "gloo"), ("nccl", "cuda", "nccl")],
)
def test_backend_choice(requested, device, want):
    """dist.backend=gloo on GPUs: the backend that lets ranks share one GPU (NCCL refuses that)."""
    assert distributed.choose_backend(requested, torch.device(device)) == want
    with pytest.raises(launchenv.LaunchError, match="dist.backend=nccl needs GPUs"):
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
    assert shared_gpu(idents[:3]) is None  # the same UUID on two hosts is two GPUs
    clash = shared_gpu(idents)
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


# every launcher variable read as a whole number, each case naming its variable
NOT_A_NUMBER = [
    ({**TORCHRUN, "WORLD_SIZE": "two"}, "WORLD_SIZE"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({**TORCHRUN, "RANK": "x"}, "RANK"),
    ({**TORCHRUN, "RANK": "-1"}, "RANK"),
    ({**TORCHRUN, "LOCAL_RANK": "1.0"}, "LOCAL_RANK"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": ""}, "LOCAL_WORLD_SIZE"),
    ({**TORCHRUN, "GROUP_WORLD_SIZE": "one"}, "GROUP_WORLD_SIZE"),
    ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT"),
    ({**TORCHRUN, "MASTER_PORT": "0"}, "MASTER_PORT"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "first"}, "TORCHELASTIC_RESTART_COUNT"),
    ({"TORCHELASTIC_RUN_ID": "r", "TORCHELASTIC_RESTART_COUNT": "1e3"}, "TORCHELASTIC_RESTART_COUNT"),
    ({**SRUN, "SLURM_NTASKS": "abc"}, "SLURM_NTASKS"),
    ({**SRUN, "SLURM_PROCID": "3rd"}, "SLURM_PROCID"),
    ({**SRUN, "SLURM_LOCALID": "one"}, "SLURM_LOCALID"),
    ({**SRUN, "SLURM_NODEID": "n1"}, "SLURM_NODEID"),
    ({**SRUN, "SLURM_JOB_ID": "7.0"}, "SLURM_JOB_ID"),
    ({**SRUN, "SLURM_STEP_NUM_NODES": "2 nodes"}, "SLURM_STEP_NUM_NODES"),
    ({**SRUN, "SLURM_STEP_NUM_NODES": None, "SLURM_JOB_NUM_NODES": "x"}, "SLURM_JOB_NUM_NODES"),
    (
        {**SRUN, "SLURM_STEP_NUM_NODES": None, "SLURM_JOB_NUM_NODES": None, "SLURM_NNODES": "?"},
        "SLURM_NNODES",
    ),
    ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2x2"}, "SLURM_STEP_TASKS_PER_NODE"),
    ({**SRUN, "SLURM_JOB_NODELIST": "[n1"}, "SLURM_JOB_NODELIST"),
    ({**SRUN, "MASTER_PORT": "port"}, "MASTER_PORT"),
    ({**SRUN, **TORCHRUN, "SLURM_STEP_NUM_TASKS": "many"}, "SLURM_STEP_NUM_TASKS"),
    ({**BATCH_SHELL, "SLURM_NTASKS": "four"}, "SLURM_NTASKS"),
    ({**BATCH_SHELL, "SLURM_JOB_NUM_NODES": "two"}, "SLURM_JOB_NUM_NODES"),
]


def without_none(env: dict) -> dict:
    return {k: v for k, v in env.items() if v is not None}


@pytest.mark.parametrize("env, name", NOT_A_NUMBER)
def test_every_launcher_variable_is_read_with_one_line_naming_it(env, name):
    env = without_none(env)
    with pytest.raises(launchenv.LaunchError) as e:
        problems(env)
    msg = str(e.value)
    assert msg.startswith(f"launcher variable {name}={env[name]!r} is not ") and "\n" not in msg


@pytest.mark.parametrize(
    "env, message",
    [
        ({**TORCHRUN, "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
        ({**TORCHRUN, "RANK": "7", "WORLD_SIZE": "4"}, "RANK=7 is not below WORLD_SIZE=4"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "5"}, "LOCAL_RANK=5 is not below WORLD_SIZE=2"),
        ({**SRUN, "SLURM_PROCID": "4"}, "SLURM_PROCID=4 is not below SLURM_NTASKS=4"),
    ],
)
def test_a_rank_outside_its_world_is_refused_before_rendezvous(env, message):
    with pytest.raises(launchenv.LaunchError) as e:
        launchenv.detect(env)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1", socket.gethostname()])
def test_master_addresses_that_resolve_pass(host):
    launchcheck.check_address(
        {"master_addr": host, "master_port": "29500", "master_addr_from": "MASTER_ADDR"}
    )


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {**TORCHRUN, "MASTER_ADDR": "no-such-host.invalid"},
            "MASTER_ADDR='no-such-host.invalid' does not resolve on this host",
        ),
        ({**TORCHRUN, "MASTER_ADDR": "a..b"}, "MASTER_ADDR='a..b' does not resolve on this host"),
        (
            {**SRUN, "SLURM_JOB_NODELIST": "gone1.invalid,gone2.invalid"},
            "MASTER_ADDR='gone1.invalid', the first host of SLURM_JOB_NODELIST, does not resolve",
        ),
    ],
)
def test_a_master_address_that_does_not_resolve_is_refused_at_once(env, message):
    t0 = time.monotonic()
    with pytest.raises(launchenv.LaunchError) as e:
        launchcheck.check_address(launchenv.detect(env))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert time.monotonic() - t0 < 30  # the resolver's answer, not dist.timeout_s


@pytest.mark.parametrize(
    "env, message",
    [  # half an srun task, and SLURM variables set by hand outside any job: as half a torchrun environment
        (
            {"SLURM_PROCID": "1"},
            "SLURM_PROCID=1 is set but SLURM_NTASKS and SLURM_STEP_ID are not",
        ),
        ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS=4 is set but SLURM_PROCID and SLURM_STEP_ID are not"),
        (
            {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
            "SLURM_PROCID=1 and SLURM_NTASKS=2 are set but SLURM_STEP_ID is not",
        ),
        (
            {k: v for k, v in SRUN.items() if k != "SLURM_NTASKS"},
            "SLURM_STEP_ID=0 and SLURM_PROCID=3 are set but SLURM_NTASKS is not",
        ),
        (
            {k: v for k, v in SRUN.items() if k != "SLURM_PROCID"},
            "SLURM_STEP_ID=0 and SLURM_NTASKS=4 are set but SLURM_PROCID is not",
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "2"},
            "SLURM_STEP_ID=2 is set but SLURM_PROCID and SLURM_NTASKS are not",
        ),
    ],
)
def test_half_a_slurm_environment_is_an_error(env, message):
    assert launchenv.detect(env)["launcher"] == "none"
    errors, _ = problems(env)
    assert len(errors) == 1 and errors[0].startswith(message), errors


@pytest.mark.parametrize(
    "env",
    [
        BATCH_SHELL,  # sbatch's shell: SLURM_PROCID and SLURM_NTASKS, no step id (it warns, see below)
        {k: v for k, v in BATCH_SHELL.items() if k != "SLURM_NTASKS"},  # sbatch without --ntasks
        {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1"},  # salloc's shell
        {**BATCH_SHELL, "SLURM_STEP_ID": "4294967291"},  # the batch step's own id
        {"SLURM_PROCID": "0"},  # leftovers that ask for one process, as RANK=0 or WORLD_SIZE=1
        {"SLURM_NTASKS": "1"},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
    ],
)
def test_shells_of_a_job_and_one_process_leftovers_are_no_half_environment(env):
    assert launchenv.detect(env)["launcher"] == "none" and problems(env)[0] == []


@pytest.mark.parametrize(
    "env, rank0, node0",
    [  # who prints a usage error (rank0) and a launch error (node0)
        ({}, True, True),  # one process
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, True, True),  # started by hand: every process
        (TORCHRUN, False, False),  # torchrun's rank 1
        ({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0"}, True, True),
        ({**TORCHRUN, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, False, True),  # first on node 2
        ({**TORCHRUN, "RANK": "one", "LOCAL_RANK": "0"}, True, True),  # no rank: the local rank decides
        ({**TORCHRUN, "RANK": "one", "LOCAL_RANK": "1"}, False, False),
        ({**TORCHRUN, "RANK": "one", "LOCAL_RANK": "one"}, True, True),  # neither: every process
        (SRUN, False, False),
        ({**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, True, True),
        ({**SRUN, "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}, False, True),
        (BATCH_SHELL, True, True),  # no srun task
    ],
)
def test_one_process_of_a_launch_prints_usage_errors(env, rank0, node0):
    assert (launchcheck.speaks(env=env), launchcheck.speaks(per_node=True, env=env)) == (rank0, node0)


# ---- how a mistake surfaces: one line, exit 2, nothing created ----------------------------------
def launcher_env(monkeypatch, env: dict) -> list:
    """os.environ with `env` as its only launcher variables. Returns the list that records each wait of a
    quiet rank for the launcher (not waited for here: a real launcher is in the torchrun test below)."""
    for k in os.environ.keys() - clean_env().keys():  # no launcher variables of our own
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    waits = []
    monkeypatch.setattr(launchcheck, "QUIET_WAIT_S", 0.0)
    real = launchcheck.wait_for_launcher
    monkeypatch.setattr(launchcheck, "wait_for_launcher", lambda: waits.append(real()))
    return waits


@pytest.mark.parametrize("local_rank, says", [("0", True), ("1", False)])
def test_more_tasks_than_gpus_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, local_rank, says):
    # a node with 2 GPUs and 4 local processes, without a GPU: the check runs before CUDA is touched. Every
    # process of the node finds it; the node's first (local rank 0) says it, the others exit 2 quietly
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    waits = launcher_env(monkeypatch, {**FOUR_LOCAL, "RANK": local_rank, "LOCAL_RANK": local_rank})
    code = exit_code(train.main, [f"run.dir={tmp_path}", "run.name=x"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    if says:
        assert len(err) == 1 and err[0].startswith("error: 4 processes on this node but only 2 GPUs")
    else:
        assert err == [] and len(waits) == 1  # quiet, once torchrun would have stopped it
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [["--no-such-option"], ["train.bogus=1"]])
@pytest.mark.parametrize("rank, says", [("0", True), ("1", False)])
def test_usage_errors_under_a_launcher_come_from_rank_0(tmp_path, monkeypatch, capsys, argv, rank, says):
    waits = launcher_env(
        monkeypatch, {**TORCHRUN, "RANK": rank, "LOCAL_RANK": rank}
    )  # torchrun's rank 0 or 1
    code = exit_code(train.main, [f"run.dir={tmp_path}", *argv])
    err = capsys.readouterr().err
    assert code == 2 and ("error: " in err if says else err == ""), err
    assert len(waits) == (0 if says else 1)
    assert not tmp_path.joinpath("x").exists() and list(tmp_path.iterdir()) == []


def entry_point(name: str, tmp_path: Path, trained: Path | None):
    """main(argv) of each command that reads the launcher's environment, with harmless arguments."""
    from resnet_dist import bench, evaluate

    return {
        "train": lambda: train.main([f"run.dir={tmp_path}", "run.name=x"]),
        "bench": lambda: bench.main(["--out", str(tmp_path / "x" / "bench.json")]),
        "evaluate": lambda: evaluate.main(
            ["--checkpoint", str(trained / "checkpoints" / "last.pt"), "--out", str(tmp_path / "x")]
        ),
        "self-test": lambda: selftest.main([]),
    }[name]


SRUN0 = {**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # the first task: it speaks
LAUNCH_MISTAKES = [
    ({"RANK": "0", "WORLD_SIZE": "two"}, "launcher variable WORLD_SIZE='two' is not a whole number >= 1"),
    (
        {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
        "MASTER_PORT='99999'",
    ),
    ({**SRUN0, "SLURM_NTASKS": "abc"}, "launcher variable SLURM_NTASKS='abc' is not"),
    (
        {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
        "RANK=2 is not below WORLD_SIZE=2",
    ),
    ({**SRUN0, "SLURM_PROCID": "-1"}, "launcher variable SLURM_PROCID='-1' is not a whole number >= 0"),
    (
        {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "1"},
        "MASTER_ADDR='no-such-host.invalid' does not resolve",
    ),
    ({"SLURM_PROCID": "1"}, "SLURM_PROCID=1 is set but SLURM_NTASKS and SLURM_STEP_ID are not"),
]


@pytest.mark.parametrize("command", ["train", "bench", "evaluate", "self-test"])
def test_launch_mistakes_are_one_line_and_exit_2_in_every_command(
    command, tmp_path, monkeypatch, capsys, request
):
    """Every command that reads the launcher's environment refuses its mistakes alike: exit 2, one line,
    before any rendezvous (nothing waits for dist.timeout_s) and before anything is written."""
    main = entry_point(
        command, tmp_path, request.getfixturevalue("trained") if command == "evaluate" else None
    )
    for env, message in LAUNCH_MISTAKES:
        launcher_env(monkeypatch, env)
        code = exit_code(main)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (
            env,
            err,
        )
        assert not (tmp_path / "x").exists()


def test_world_size_without_master_exits_2_at_once(tmp_path):
    t0 = time.monotonic()
    code, _, err = call(train.main, f"run.dir={tmp_path}", "run.name=x", RANK="0", WORLD_SIZE="2")
    assert code == 2 and time.monotonic() - t0 < 60, err
    assert err.strip().splitlines() == [
        "error: WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT is not set: every process needs rank 0's address "
        "and port (torchrun, srun and accelerate launch set them)"
    ]
    assert not (tmp_path / "x").exists()


def test_unresolvable_master_addr_exits_2_at_once(tmp_path):
    """It used to wait the whole dist.timeout_s (600 s), then print C++ frames and blame a busy port."""
    env = dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="no-such-host.invalid", MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    code, _, err = call(train.main, f"run.dir={tmp_path}", "run.name=x", **env)
    assert code == 2 and time.monotonic() - t0 < 90, err
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: MASTER_ADDR='no-such-host.invalid' does not resolve"
    ), err
    assert not (tmp_path / "x").exists()


@pytest.mark.processes
def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    """Three ranks hit the same bad key: rank 0 says it and exits 2; the others wait quietly until torchrun
    stops them (SIGTERM), so that rank 0 is never stopped before it prints. torchrun's own summary
    (ChildFailedError, each rank with its exit code, rank 0 the root cause) follows our line."""
    proc = run(torchrun(3) + [f"run.dir={tmp_path}", "run.name=x", "train.bogus=1"], timeout=180)
    assert proc.returncode == 1  # torchrun's own code for failed workers
    err = proc.stderr
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith("error: unknown config key 'train.bogus'"), err
    assert err.index(ours[0]) < err.index("ChildFailedError"), err
    failures, root = err.split("Root Cause (first observed failure):")
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 2" in root, err
    assert failures.count("exitcode  : -15") == 2, err  # ranks 1 and 2, stopped by torchrun
    assert not (tmp_path / "x").exists()


# ---- the launchers, for real, on CPU ------------------------------------------------------------
@pytest.mark.processes
def test_launch_torchrun_sh_two_cpu_processes(tmp_path, data_root):
    env = {"NPROC": "", "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible: 2 CPU processes
    proc = run(["bash", "launch/torchrun.sh", *small_run(data_root, tmp_path, "tr", *TINY)], **env)
    assert proc.returncode == 0, proc.stderr
    assert "resnet_dist: launcher=torchrun world_size=2 nodes=1 backend=gloo" in proc.stdout
    ep = epochs(read_metrics(tmp_path / "tr"))
    assert [(r["epoch"], r["world_size"], r["test/samples"]) for r in ep] == [(0, 2, 999)]


@pytest.mark.processes
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


@pytest.mark.processes
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


@pytest.mark.processes
def test_losing_a_node_keeps_the_run(tmp_path, data_root):
    """Elastic: two agents (torchrun --nnodes=1:2 --max-restarts=3, c10d rendezvous), one process each. The
    second agent and its worker are SIGKILLed mid-epoch: the first agent's worker restarts alone, resumes from
    the newest checkpoint at world size 1 with the same global batch, and finishes; nothing logged twice. The
    second agent's worker is held after the step-10 checkpoint until then (tests/held.py, through the launch
    script: tests/hold_site)."""
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
    held = tmp_path / "held"  # in epoch 1, after epoch 0 on 2 ranks: its worker, whichever rank it is, holds
    node = subprocess.Popen(
        [*cmd, "last_call_timeout=5,is_host=false", *args],
        cwd=REPO,
        env=clean_env(**hold(held, "step 10", rank=None, site=True)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # bash execs torchrun: node.pid is the agent
    wait_for(marker(held, "step 10"), host, node)
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
