"""Resume that loses nothing: real torchrun restarts, real signals, real killed processes."""

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from resnet_dist import checkpoint

from .helpers import (
    PY,
    REPO,
    RESUME,
    clean_env,
    epochs,
    free_port,
    read_metrics,
    run,
    small_run,
    torchrun,
    without_timing,
)


def assert_same_metrics(a, b):
    ca, cb = without_timing(a), without_timing(b)
    assert [r.keys() for r in ca] == [r.keys() for r in cb]
    for ra, rb in zip(ca, cb):
        for k in ra:
            if isinstance(ra[k], float):
                assert abs(ra[k] - rb[k]) <= 1e-6, (k, ra, rb)
            else:
                assert ra[k] == rb[k], (k, ra, rb)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """The uninterrupted 2-rank run every interrupted one must reproduce."""
    d = tmp_path_factory.mktemp("ref")
    proc = run(torchrun(2) + small_run(data_root, d, "ref", *RESUME))
    assert proc.returncode == 0, proc.stderr
    return read_metrics(d / "ref")


def worker_pid(tag: str, rank: int, timeout: float = 60) -> int:
    """The pid of the training process of `rank` among the processes launched with TEST_TAG=tag."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if (
                f"TEST_TAG={tag}".encode() in env
                and f"RANK={rank}".encode() in env
                and b"resnet_dist.train" in cmd
                and b"torch.distributed.run" not in cmd
            ):
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process found")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def launch(cmd, **env):
    return subprocess.Popen(
        cmd, cwd=REPO, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_sigkilled_rank_restarts_and_matches_uninterrupted(tmp_path, data_root, reference):
    """No run.name: the restarted workers find their first attempt's directory by torchrun's run id."""
    tag = uuid.uuid4().hex
    proc = launch(
        torchrun(2, "--max-restarts=1", "--monitor-interval=0.2", f"--rdzv-id={tag}")
        + small_run(data_root, tmp_path, "k", *RESUME, "run.name=null"),
        TEST_TAG=tag,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/checkpoints/step-00000004.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    os.kill(worker_pid(tag, 1), signal.SIGKILL)  # mid-epoch 0 (8 steps), after the step-4 checkpoint
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed at step" in out  # the second attempt resumed rather than started over
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # one run directory, timestamped
    assert (run_dir / ".torchrun_id").read_text() == tag
    assert_same_metrics(read_metrics(run_dir), reference)


def preempted_at(out: str) -> int:
    assert out.count("preempted: checkpoint saved at step") == 1, out
    return int(out.split("checkpoint saved at step ")[1].split(";")[0])


def test_signals_checkpoint_exit_cleanly_and_restarts_match(tmp_path, data_root, reference):
    """SIGUSR1 to one rank, then Ctrl-C (SIGINT) to the torchrun agent (which forwards it to the workers in
    their own sessions), then a restart to the end."""
    args = small_run(data_root, tmp_path, "u", *RESUME)
    tag = uuid.uuid4().hex
    proc = launch(torchrun(2) + args, TEST_TAG=tag)
    wait_for(tmp_path / "u" / "checkpoints" / "step-00000002.pt", proc)
    os.kill(worker_pid(tag, 1), signal.SIGUSR1)  # one rank only: the other learns it through the agreement
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    first = preempted_at(out)
    assert 2 < first < 24
    state = checkpoint.load(tmp_path / "u" / "checkpoints" / "last.pt")
    assert state["progress"]["global_step"] == first and len(state["rng"]) == 2  # both ranks took part
    assert max(r["step"] for r in read_metrics(tmp_path / "u")) <= first

    proc = launch(torchrun(2) + args)
    wait_for(tmp_path / "u" / "checkpoints" / f"step-{first + 2 - first % 2:08d}.pt", proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C, to torchrun itself
    out, err = proc.communicate(timeout=300)
    assert f"resumed at step {first}" in out
    second = preempted_at(out)
    assert first < second < 24
    assert checkpoint.load(tmp_path / "u" / "checkpoints" / "last.pt")["progress"]["global_step"] == second

    again = run(torchrun(2) + args)
    assert again.returncode == 0, again.stderr
    assert f"resumed at step {second}" in again.stdout
    assert_same_metrics(read_metrics(tmp_path / "u"), reference)


def test_resume_on_another_world_size_keeps_the_global_batch(tmp_path, data_root):
    first = run(torchrun(2) + small_run(data_root, tmp_path, "w", *RESUME, "train.epochs=1"))
    assert first.returncode == 0, first.stderr
    second = run(
        [PY, "-m", "resnet_dist.train"] + small_run(data_root, tmp_path, "w", *RESUME, "train.epochs=2")
    )
    assert second.returncode == 0, second.stderr
    assert "resumed at step 8" in second.stdout
    ep = epochs(read_metrics(tmp_path / "w"))
    assert [(r["epoch"], r["world_size"], r["step"]) for r in ep] == [(0, 2, 8), (1, 1, 16)]


def test_truncated_newest_checkpoint_falls_back_and_another_model_is_refused(tmp_path, data_root):
    args = small_run(data_root, tmp_path, "t", "train.epochs=1", "checkpoint.every_steps=3")
    first = run([PY, "-m", "resnet_dist.train"] + args)
    assert first.returncode == 0, first.stderr
    ckpts = tmp_path / "t" / "checkpoints"
    # saved at steps 3, 6 and 8 (epoch end); checkpoint.keep=2 keeps the newest two
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step-00000006.pt", "step-00000008.pt"]
    assert (ckpts / "last.pt").samefile(ckpts / "step-00000008.pt") or (ckpts / "last.pt").read_bytes() == (
        ckpts / "step-00000008.pt"
    ).read_bytes()
    newest = ckpts / "step-00000008.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    other = run([PY, "-m", "resnet_dist.train"] + args + ["model.stem=cifar"])
    assert other.returncode == 2  # the fallback checkpoint is from another model: refused, in one line
    assert "cannot resume with a changed model.stem" in other.stderr.splitlines()[-1]

    again = run([PY, "-m", "resnet_dist.train"] + args + ["train.epochs=2"])
    assert again.returncode == 0, again.stderr
    warnings = [line for line in again.stderr.splitlines() if "step-00000008.pt" in line]
    assert len(warnings) == 1 and "not a valid checkpoint" in warnings[0]
    assert "resumed at step 6" in again.stdout
    assert [r["epoch"] for r in epochs(read_metrics(tmp_path / "t"))] == [0, 1]


def test_killed_peer_makes_the_survivor_fail_within_the_timeout(tmp_path, data_root):
    port, tag = free_port(), uuid.uuid4().hex
    args = small_run(data_root, tmp_path, "p", "train.epochs=50", "dist.timeout_s=20")
    procs = [
        launch(
            [PY, "-m", "resnet_dist.train", *args],
            RANK=r,
            LOCAL_RANK=r,
            WORLD_SIZE=2,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            TEST_TAG=tag,
        )
        for r in (0, 1)
    ]
    wait_for(tmp_path / "p" / "checkpoints" / "last.pt", procs[0])
    procs[1].kill()
    t0 = time.time()
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode not in (0, None)
    assert time.time() - t0 < 20 + 30
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "another rank died" in last, err[-2000:]
    procs[1].communicate()
