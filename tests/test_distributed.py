import os
import signal
import warnings

import pytest

from resnet_dist import distributed, launchenv, preemption
from resnet_dist.model import wrap_ddp

from .helpers import exit_code, in_gloo_group, run, torchrun


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node1", "node1"),
        ("gpu[07-09,12]", "gpu07"),
        ("gpu[3]", "gpu3"),
        ("a-1,b-2", "a-1"),
        ("rack1-n[001-004],rack2-n1", "rack1-n001"),
    ],
)
def test_first_host(nodelist, first):
    assert launchenv.first_host(nodelist) == first


def test_detect_torchrun():
    d = launchenv.detect(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "5",
        }
    )
    assert (d["rank"], d["local_rank"], d["world_size"], d["launcher"], d["num_nodes"]) == (
        3,
        1,
        4,
        "torchrun",
        2,
    )


def test_detect_accelerate():
    d = launchenv.detect(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "bf16"}
    )
    assert d["launcher"] == "accelerate"


def test_detect_srun_derives_master_from_nodelist_and_job():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[10-13]",
        "SLURM_JOB_NUM_NODES": "4",
    }
    d = launchenv.detect(env)
    assert (d["rank"], d["local_rank"], d["world_size"], d["launcher"]) == (5, 1, 8, "srun")
    assert d["master_addr"] == "gpu10" and d["master_port"] == str(20000 + 4242) and d["num_nodes"] == 4


def test_torchrun_inside_an_allocation_wins_over_slurm():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_ID": "0",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
    }
    assert launchenv.detect(env)["launcher"] == "torchrun"


def test_batch_script_without_srun_is_a_single_process():
    # sbatch's own shell has SLURM_PROCID and SLURM_NTASKS but is no srun step
    assert (
        launchenv.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"})["world_size"] == 1
    )


def test_no_launcher():
    assert launchenv.detect({})["world_size"] == 1


@pytest.mark.processes
def test_self_test_all_reduces_correctly_in_a_real_group():
    proc = run(torchrun(3, module="resnet_dist.selftest"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("all_reduce self-test: backend=gloo world_size=3 device=cpu correct") == 1


def test_self_test_single_process_and_usage(capsys):
    from resnet_dist import selftest

    assert selftest.main(["--size-mb", "1"]) == 0
    assert "world_size=1 device=cpu correct, 1 MB in" in capsys.readouterr().out
    assert exit_code(selftest.main, ["--size-mb", "x"]) == 2


def _agreement(env):
    import torch

    found = {}
    for lag, every in ((1, 1), (3, 1), (1, 3)):
        p = preemption.Preemption(env, lag=lag, every=every)  # not installed: the test raises the flag itself
        stops = []
        for step in range(1, 13):
            if env.rank == 1 and step == 4:
                p.received = True  # what the signal handler does, on one rank only
            stops.append(p.agreed(step))
        found[lag, every] = (stops.index(True) + 1, p.drain(), p.count)
    # a real SIGTERM to rank 1, through the installed handler
    p = preemption.Preemption(env).install()
    stops = []
    for step in range(6):
        if env.rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        stops.append(p.agreed(step))
    found["sigterm"] = stops.index(True)
    # the epoch-end drain: a flag raised in the last steps is still agreed on every rank
    p = preemption.Preemption(env, lag=2)
    p.received = env.rank == 0
    found["drain"] = (p.agreed(0), p.drain(), p.drain())
    # rank 0's buffers (BatchNorm statistics) reach every rank; rank 0's decision too
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(env.rank + 1.0)
    bn.num_batches_tracked.fill_(env.rank + 5)
    distributed.broadcast_buffers(bn)
    found["buffers"] = (bn.running_mean.tolist(), int(bn.num_batches_tracked))
    found["decides"] = distributed.rank0_decides(env.rank == 0, env.device)
    # DDP leaves each rank's buffers alone in forward (and this torch does not warn about how we ask it)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = wrap_ddp(torch.nn.BatchNorm2d(3), env, bucket_mb=25, compression="none")
    ddp.module.running_mean.fill_(env.rank + 1.0)
    with torch.no_grad():
        ddp.eval()(torch.zeros(1, 3, 2, 2))
    found["ddp"] = (ddp.module.running_mean.tolist(), [str(w.message) for w in caught])
    return found


@pytest.mark.processes
def test_preemption_agreement_and_rank0_state_in_a_real_group():
    got = in_gloo_group(_agreement, 2)
    for rank in (0, 1):
        # the flag raised at step 4 on rank 1 stops both ranks at the same step: read `lag` agreements later,
        # and with an agreement every 3 steps (3, 6, 9, 12) only at those, within every x (lag + 1) steps
        assert got[rank][1, 1] == (5, True, 12) and got[rank][3, 1] == (7, True, 12), got
        assert got[rank][1, 3] == (9, True, 4), got
        assert got[rank]["drain"] == (False, True, False) and got[rank]["sigterm"] == 3
        assert got[rank]["buffers"] == ([1.0, 1.0, 1.0], 5) and got[rank]["decides"] is True
        assert got[rank]["ddp"] == ([rank + 1.0] * 3, []), got
