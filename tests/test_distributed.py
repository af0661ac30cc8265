import pytest

from resnet_dist import distributed

from .conftest import PY, run, torchrun


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[07-09,12]", "gpu07"), ("gpu[3]", "gpu3"), ("a-1,b-2", "a-1"),
    ("rack1-n[001-004],rack2-n1", "rack1-n001"),
])
def test_first_host(nodelist, first):
    assert distributed.first_host(nodelist) == first


def test_detect_torchrun():
    d = distributed.detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                            "MASTER_ADDR": "h", "MASTER_PORT": "5"})
    assert (d["rank"], d["local_rank"], d["world_size"], d["launcher"], d["num_nodes"]) == (3, 1, 4, "torchrun", 2)


def test_detect_accelerate():
    d = distributed.detect({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert d["launcher"] == "accelerate"


def test_detect_srun_derives_master_from_nodelist_and_job():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[10-13]", "SLURM_JOB_NUM_NODES": "4"}
    d = distributed.detect(env)
    assert (d["rank"], d["local_rank"], d["world_size"], d["launcher"]) == (5, 1, 8, "srun")
    assert d["master_addr"] == "gpu10" and d["master_port"] == str(20000 + 4242) and d["num_nodes"] == 4


def test_torchrun_inside_an_allocation_wins_over_slurm():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "RANK": "1", "WORLD_SIZE": "2",
           "LOCAL_RANK": "1"}
    assert distributed.detect(env)["launcher"] == "torchrun"


def test_batch_script_without_srun_is_a_single_process():
    # sbatch's own shell has SLURM_PROCID and SLURM_NTASKS but is no srun step
    assert distributed.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"})["world_size"] == 1


def test_no_launcher():
    assert distributed.detect({})["world_size"] == 1


def test_self_test_all_reduces_correctly_in_a_real_group():
    proc = run(torchrun(3, module="resnet_dist.distributed") + ["--self-test"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("all_reduce self-test: backend=gloo world_size=3 device=cpu correct") == 1


def test_self_test_single_process_and_usage():
    proc = run([PY, "-m", "resnet_dist.distributed", "--self-test"])
    assert proc.returncode == 0 and "world_size=1 device=cpu correct" in proc.stdout
    assert run([PY, "-m", "resnet_dist.distributed"]).returncode == 2
