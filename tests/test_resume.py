"""Resume that loses nothing: real torchrun restarts, real signals, real killed processes."""

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest

from resnet_dist import checkpoint, train

from .held import marker
from .helpers import (
    HELD,
    RESUME,
    call,
    epochs,
    free_port,
    hold,
    launch,
    read_metrics,
    run,
    small_run,
    torchrun,
    wait_for,
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
def reference(tmp_path_factory, data_root) -> Path:
    """The uninterrupted 2-rank run every interrupted one must reproduce (its directory). It saves at every
    epoch's end too and keeps every checkpoint (which changes no metric): another world size resumes from the
    one after epoch 0."""
    d = tmp_path_factory.mktemp("ref")
    keep_all = ("checkpoint.keep=20", "checkpoint.max_overhead=1")
    proc = run(torchrun(2) + small_run(data_root, d, "ref", *RESUME, *keep_all))
    assert proc.returncode == 0, proc.stderr
    return d / "ref"


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
                and (b"resnet_dist.train" in cmd or b"tests.held" in cmd)
                and b"torch.distributed.run" not in cmd
            ):
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process found")


@pytest.mark.processes
def test_sigkilled_rank_restarts_and_matches_uninterrupted(tmp_path, data_root, reference):
    """No run.name: the restarted workers find their first attempt's directory by torchrun's run id. Rank 1
    is held after the step-4 checkpoint (mid-epoch 0, of 8 steps) until it is killed (tests/held.py)."""
    tag, held, runs = uuid.uuid4().hex, tmp_path / "held", tmp_path / "runs"
    proc = launch(
        torchrun(2, "--max-restarts=1", "--monitor-interval=0.2", f"--rdzv-id={tag}", module="tests.held")
        + small_run(data_root, runs, "k", *RESUME, "run.name=null"),
        TEST_TAG=tag,
        **hold(held, "step 4", rank=1),
    )
    wait_for(marker(held, "step 4"), proc)
    os.kill(worker_pid(tag, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed at step 4" in out  # the second attempt resumed rather than started over
    (run_dir,) = list(runs.iterdir())  # one run directory, timestamped
    assert (run_dir / ".torchrun_id").read_text() == tag
    assert_same_metrics(read_metrics(run_dir), read_metrics(reference))


def preempted_at(out: str) -> int:
    assert out.count("preempted: checkpoint saved at step") == 1, out
    return int(out.split("checkpoint saved at step ")[1].split(";")[0])


@pytest.mark.processes
def test_signals_checkpoint_exit_cleanly_and_restarts_match(tmp_path, data_root, reference):
    """SIGUSR1 to one rank, then Ctrl-C (SIGINT) to the torchrun agent (which forwards it to the workers in
    their own sessions), then a restart to the end. Each run is held until its signal has come (tests/held.py):
    rank 1 after the step-2 checkpoint, then rank 0 after the resumed run's first checkpoint."""
    args = small_run(data_root, tmp_path, "u", *RESUME)
    tag = uuid.uuid4().hex
    proc = launch(
        torchrun(2, module="tests.held") + args,
        TEST_TAG=tag,
        **hold(tmp_path / "h1", "step 2 until signal", rank=1),
    )
    wait_for(marker(tmp_path / "h1", "step 2"), proc)
    os.kill(worker_pid(tag, 1), signal.SIGUSR1)  # one rank only: the other learns it through the agreement
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    first = preempted_at(out)
    assert 2 < first < 24
    state = checkpoint.load(tmp_path / "u" / "checkpoints" / "last.pt")
    assert state["progress"]["global_step"] == first and len(state["rng"]) == 2  # both ranks took part
    assert max(r["step"] for r in read_metrics(tmp_path / "u")) <= first

    saved = first + 2 - first % 2  # the resumed run's first checkpoint (every 2 steps)
    proc = launch(
        torchrun(2, module="tests.held") + args, **hold(tmp_path / "h2", f"step {saved} until signal")
    )
    wait_for(marker(tmp_path / "h2", f"step {saved}"), proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C, to torchrun itself
    out, err = proc.communicate(timeout=300)
    assert f"resumed at step {first}" in out
    second = preempted_at(out)
    assert saved < second < 24
    assert checkpoint.load(tmp_path / "u" / "checkpoints" / "last.pt")["progress"]["global_step"] == second

    again = run(torchrun(2) + args)
    assert again.returncode == 0, again.stderr
    assert f"resumed at step {second}" in again.stdout
    assert_same_metrics(read_metrics(tmp_path / "u"), read_metrics(reference))


@pytest.mark.processes
def test_resume_on_another_world_size_keeps_the_global_batch(tmp_path, data_root, reference):
    """The 2-rank reference's checkpoint after epoch 0, resumed by one process (in this one): the same global
    batch, so the same steps per epoch."""
    run_dir = tmp_path / "w"
    shutil.copytree(reference, run_dir)
    for p in checkpoint.step_files(run_dir / "checkpoints"):
        if int(p.name[5:13]) > 8:
            p.unlink()
    (run_dir / "checkpoints" / "last.pt").unlink()
    code, out, err = call(train.main, *small_run(data_root, tmp_path, "w", *RESUME, "train.epochs=2"))
    assert code == 0, err
    assert "resumed at step 8" in out, out
    ep = epochs(read_metrics(run_dir))
    assert [(r["epoch"], r["world_size"], r["step"]) for r in ep] == [(0, 2, 8), (1, 1, 16)]


def test_truncated_newest_checkpoint_falls_back_and_another_model_is_refused(tmp_path, data_root):
    """In this process, as `python -m resnet_dist.train` three times."""
    args = small_run(data_root, tmp_path, "t", "train.epochs=1", "checkpoint.every_steps=3")
    code, _, err = call(train.main, *args)
    assert code == 0, err
    ckpts = tmp_path / "t" / "checkpoints"
    # saved at steps 3, 6 and 8 (epoch end); checkpoint.keep=2 keeps the newest two
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step-00000006.pt", "step-00000008.pt"]
    assert (ckpts / "last.pt").samefile(ckpts / "step-00000008.pt") or (ckpts / "last.pt").read_bytes() == (
        ckpts / "step-00000008.pt"
    ).read_bytes()
    newest = ckpts / "step-00000008.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    code, _, err = call(train.main, *args, "model.stem=cifar")
    assert code == 2  # the fallback checkpoint is from another model: refused, in one line
    assert "cannot resume with a changed model.stem" in err.splitlines()[-1]

    code, out, err = call(train.main, *args, "train.epochs=2")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "step-00000008.pt" in line]
    assert len(warnings) == 1 and "not a valid checkpoint" in warnings[0]
    assert "resumed at step 6" in out
    assert [r["epoch"] for r in epochs(read_metrics(tmp_path / "t"))] == [0, 1]


@pytest.mark.processes
def test_killed_peer_makes_the_survivor_fail_within_the_timeout(tmp_path, data_root):
    """Two processes started by hand; rank 1 is held after its first step until it is killed (tests/held.py)."""
    port, held = free_port(), tmp_path / "held"
    args = small_run(data_root, tmp_path, "p", "train.epochs=50", "dist.timeout_s=20")
    env = {"WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **hold(held, "step 1", rank=1)}
    procs = [launch(HELD + args, RANK=r, LOCAL_RANK=r, **env) for r in (0, 1)]
    wait_for(marker(held, "step 1"), *procs)
    procs[1].kill()
    t0 = time.time()
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode not in (0, None)
    assert time.time() - t0 < 20 + 30
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "another rank died" in last, err[-2000:]
    procs[1].communicate()
