"""sbatch slurm/train.sh and slurm/train_torchrun.sh on a real local SLURM cluster (2 nodes in network
namespaces, see slurm_cluster.py): one node, two nodes, torchrun per node, preemption + requeue + resume,
and what the batch shell and a mixed-up torchrun look like from inside a real allocation.

Run only these with `pytest -m slurm` (they need root; elsewhere they skip with the reason).
"""

import re
from pathlib import Path

import pytest
import yaml

from resnet_dist import launchcheck, launchenv

from .held import marker
from .helpers import PY, REPO, clean_env, epochs, hold, read_metrics, small_run
from .slurm_cluster import TERMINAL

pytestmark = pytest.mark.slurm

# The CPU layout on the sbatch command line, over the scripts' GPU defaults (see slurm/train.sh):
# the test cluster has no GPU GRES and 2 CPUs per node.
CPU = ("--gpus-per-node=0", "--cpus-per-task=1")
TINY = ("data.train_subset=256", "train.epochs=1", "log.every_steps=2")


def job_args(data_root, run_dir, *overrides):
    """small_run's overrides, smaller, and run.name=null: the run directory is named after the job id."""
    return small_run(data_root, run_dir, "null", *TINY, *overrides)


def submit(cluster, tmp_path, script, *sbatch_args, train_args=(), **env) -> str:
    env = clean_env(PYTHON=PY, CONFIG="configs/cpu.yaml", **env)
    return cluster.sbatch(
        *CPU, f"--output={tmp_path}/%x-%j.out", *sbatch_args, script, *train_args, env=env, cwd=REPO
    )


def log_of(tmp_path, job) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"*-{job}.out")))


def finish(cluster, tmp_path, job, timeout=180) -> tuple[dict, str]:
    info = cluster.wait(job, timeout)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED", f"job {job}: {info.get('JobState')} {info.get('Reason')}\n{log}"
    return info, log


def check_epochs(run_path: Path, world_size: int, n_epochs: int = 1, test_samples: int = 999):
    ep = epochs(read_metrics(run_path))
    assert [r["epoch"] for r in ep] == list(range(n_epochs))  # each epoch exactly once
    assert all(r["world_size"] == world_size and r["test/samples"] == test_samples for r in ep)
    return ep


def test_batch_shell_is_no_srun_step_and_launch_mistakes_are_caught(slurm_cluster, tmp_path, data_root):
    """In a real 2-node allocation: the batch shell has no SLURM_STEP_ID (so detect() calls it no srun step),
    python started there warns that it trains alone, and `srun torchrun --standalone` stops with one line."""
    out = tmp_path / "out"
    out.mkdir()
    tiny = " ".join(job_args(data_root, tmp_path, "data.train_subset=128", "data.test_subset=100"))
    script = tmp_path / "mistakes.sh"
    script.write_text(f"""#!/bin/bash
env -0 > {out}/batch.env
srun bash -c 'env -0 > {out}/step.$SLURM_PROCID.env'
"$PYTHON" -m resnet_dist.train {tiny} run.name=alone > {out}/alone.log 2>&1; echo "rc=$?" >> {out}/alone.log
srun "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node=1 -m resnet_dist.train {tiny} run.name=mixed \\
  > {out}/mixed.log 2>&1; echo "rc=$?" >> {out}/mixed.log
""")
    job = submit(slurm_cluster, tmp_path, str(script), "--nodes=2", "--ntasks-per-node=1")
    finish(slurm_cluster, tmp_path, job)

    def read_env(name):
        return dict(kv.split("=", 1) for kv in (out / name).read_text().split("\0") if "=" in kv)

    batch = read_env("batch.env")
    assert "SLURM_STEP_ID" not in batch and batch["SLURM_PROCID"] == "0" and batch["SLURM_NTASKS"] == "2"
    assert launchenv.detect(batch)["launcher"] == "none"
    assert "not started by srun" in launchcheck.check_launch(launchenv.detect(batch), batch)[1][0]
    for rank in (0, 1):
        step = read_env(f"step.{rank}.env")
        d = launchenv.detect(step)
        assert (
            d["launcher"],
            d["rank"],
            d["world_size"],
            d["local_rank"],
            d["local_world_size"],
            d["num_nodes"],
        ) == ("srun", rank, 2, 0, 1, 2)
        assert d["master_addr"] == "node1" and launchcheck.check_launch(d, step) == ([], [])

    alone = (out / "alone.log").read_text()
    assert "rc=0" in alone and "launcher=none world_size=1" in alone, alone
    assert "warning: this SLURM job has 2 tasks but this process was not started by srun" in alone
    mixed = (out / "mixed.log").read_text()
    assert "rc=0" not in mixed and "error: srun started 2 tasks that each run torchrun" in mixed, mixed
    assert not (tmp_path / "mixed").exists()


def test_sbatch_two_nodes_one_task_each(slurm_cluster, tmp_path, data_root):
    job = submit(
        slurm_cluster,
        tmp_path,
        "slurm/train.sh",
        "--nodes=2",
        "--ntasks-per-node=1",
        train_args=job_args(data_root, tmp_path),
    )
    info, log = finish(slurm_cluster, tmp_path, job)
    assert info["NodeList"] == "node[1-2]"
    assert log.count("resnet_dist: launcher=srun world_size=2 nodes=2 backend=gloo") == 1, log
    check_epochs(tmp_path / job, world_size=2)


def test_sbatch_torchrun_two_nodes(slurm_cluster, tmp_path, data_root):
    job = submit(
        slurm_cluster,
        tmp_path,
        "slurm/train_torchrun.sh",
        "--nodes=2",
        train_args=job_args(data_root, tmp_path),
    )
    info, log = finish(slurm_cluster, tmp_path, job)
    assert info["NodeList"] == "node[1-2]"
    assert f"rendezvous node1:{20000 + int(job) % 20000}" in log
    assert log.count("resnet_dist: launcher=torchrun world_size=2 nodes=2 backend=gloo") == 1, log
    check_epochs(tmp_path / job, world_size=2)


def held_until(cluster, job: str, at: Path) -> None:
    """Until the job's run is held at the marker `at` (or has ended, which the test's next check reports)."""
    cluster.wait(job, 120, until=lambda j: j.get("JobState") in TERMINAL or at.exists())


def test_sbatch_one_node_two_tasks_preempted_requeues_and_resumes(slurm_cluster, tmp_path, data_root):
    """slurm/train.sh on one node with two tasks; USR1 mid-training (what --signal=USR1@120 sends before the
    time limit): the ranks checkpoint, rank 0 requeues the job, the job starts again with the same id, resumes
    in the same run directory, completes. Rank 0 is held after its first step until the signal has come
    (tests/held.py, through sbatch and srun: tests/hold_site)."""
    held = tmp_path / "held"
    job = submit(
        slurm_cluster,
        tmp_path,
        "slurm/train.sh",
        "--nodes=1",
        "--ntasks-per-node=2",
        train_args=job_args(
            data_root, tmp_path, "data.train_subset=512", "train.epochs=2", "log.every_steps=1"
        ),
        **hold(held, "step 1 until signal", site=True),
    )
    held_until(slurm_cluster, job, marker(held, "step 1"))
    slurm_cluster.run("scancel", "--signal=USR1", job)
    info, log = finish(slurm_cluster, tmp_path, job, timeout=240)
    assert info["NumNodes"] == "1" and info["NumTasks"] == "2"
    # rank 0 alone speaks, once in each start of the job
    assert log.count("resnet_dist: launcher=srun world_size=2 nodes=1 backend=gloo") == 2, log
    assert info["Restarts"] == "1", log
    saved = re.search(r"preempted: checkpoint saved at step (\d+)", log)
    assert saved and f"requeued SLURM job {job}" in log, log
    assert f"resumed at step {saved.group(1)}" in log and 1 < int(saved.group(1)) < 16, log
    check_epochs(tmp_path / job, world_size=2, n_epochs=2)
    steps = [r["step"] for r in read_metrics(tmp_path / job) if r.get("kind") == "step"]
    assert steps == list(range(1, 17))  # nothing lost, nothing twice


def test_job_array_tasks_train_apart_and_a_preempted_task_requeues_alone(slurm_cluster, tmp_path, data_root):
    """sbatch --array=0-1: two run directories (ARRAYJOB_TASK), {task} filled in per task; USR1 to task 1
    requeues task 1 alone, which resumes and finishes. Task 1 is held after its first step until the signal."""
    held = tmp_path / "held"
    array = submit(
        slurm_cluster,
        tmp_path,
        "slurm/train.sh",
        "--array=0-1",
        "--nodes=1",
        "--ntasks-per-node=1",
        f"--output={tmp_path}/%x-%A_%a.out",
        train_args=job_args(
            data_root,
            tmp_path,
            "data.train_subset=512",
            "train.epochs=2",
            "log.every_steps=1",
            "run.seed={task}",
        ),
        **hold(held, "step 1 until signal", only_if="SLURM_ARRAY_TASK_ID=1", site=True),
    )
    held_until(slurm_cluster, f"{array}_1", marker(held, "step 1"))
    slurm_cluster.run("scancel", "--signal=USR1", f"{array}_1")
    infos = [slurm_cluster.wait(f"{array}_{t}", 240) for t in (0, 1)]
    logs = ["".join(p.read_text() for p in tmp_path.glob(f"*-{array}_{t}.out")) for t in (0, 1)]
    assert [i["JobState"] for i in infos] == ["COMPLETED", "COMPLETED"], logs
    assert [i["Restarts"] for i in infos] == ["0", "1"], logs
    assert f"requeued SLURM job {array}_1" in logs[1] and "requeued" not in logs[0]
    for t in (0, 1):
        run_dir = tmp_path / f"{array}_{t}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["seed"] == t
        check_epochs(run_dir, world_size=1, n_epochs=2)
    steps = [r["step"] for r in read_metrics(tmp_path / f"{array}_1") if r.get("kind") == "step"]
    assert steps == list(range(1, 17))  # nothing lost, nothing twice
