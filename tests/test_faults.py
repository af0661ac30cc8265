"""Nothing lost, nothing silently wrong: a careless or unlucky user's run, on real processes. Two launches into
one directory, a diverging LR, a changed config on resume, hand-damaged run directories, Ctrl-C, a full disk,
a busy port, a peer that never comes. Each ends in one line on stderr and the right exit code."""

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from resnet_dist import checkpoint, evaluate, train

from .held import marker
from .helpers import (
    HELD,
    PY,
    call,
    epochs,
    free_port,
    hold,
    launch,
    read_metrics,
    run,
    small_run,
    tmpfs,
    wait_for,
)

TRAIN = [PY, "-m", "resnet_dist.train"]


def one_line(stderr: str) -> str:
    """The single line a failing command printed on stderr (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def train_here(*argv: str) -> tuple[int, str, str]:
    """`python -m resnet_dist.train ARGS` in this process (helpers.call): (code, stdout, stderr)."""
    return call(train.main, *argv)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- two runs, one directory ---------------------------------------------------------------------------
@pytest.mark.processes
def test_a_second_run_in_a_busy_directory_is_refused_and_a_dead_holder_blocks_nobody(tmp_path, data_root):
    args = small_run(data_root, tmp_path, "busy", "train.epochs=3", "log.every_steps=2")
    first = launch(HELD + args, **hold(tmp_path / "held", "step 0"))  # held with the directory, until killed
    wait_for(marker(tmp_path / "held", "step 0"), first)
    second = run(TRAIN + args, timeout=120)
    assert second.returncode == 2
    line = one_line(second.stderr)
    assert f"is in use by {socket.gethostname()} pid {first.pid}" in line and "run.name" in line
    first.send_signal(signal.SIGKILL)  # the holder dies without releasing anything
    first.communicate()
    third = run(TRAIN + args + ["train.epochs=1", "data.train_subset=128"], timeout=180)
    assert third.returncode == 0, third.stderr
    assert (tmp_path / "busy" / "metrics.jsonl").read_text().count('"kind": "epoch"') == 1


def test_a_fresh_start_sets_the_earlier_run_aside_and_the_next_resume_continues_it(
    tmp_path, data_root, monkeypatch
):
    """Two epochs; then checkpoint.resume=never with another LR; then an automatic resume. The fresh start
    moves the first run's files into previous/<time>/: the resume continues the fresh run, metrics.jsonl is
    the fresh run's alone, and the rotation keeps its step files (the old ones were numbered higher)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "nv2"
    args = small_run(data_root, "~/runs", "nv2", "data.train_subset=256", "data.test_subset=128")
    args += ["checkpoint.every_steps=2", "checkpoint.keep=2"]  # 4 steps an epoch
    code, out, err = train_here(*args, "train.epochs=2")
    assert code == 0, err
    assert f"run_dir={run_dir} fresh start" in out.splitlines()[0]  # ~ expanded, the absolute path said
    first = read_metrics(run_dir)

    code, out, err = train_here(*args, "train.epochs=1", "checkpoint.resume=never", "train.lr=0.01")
    assert code == 0, err
    (aside,) = (run_dir / "previous").iterdir()
    assert out.splitlines()[0] == (
        "starting over: the earlier run's files in this directory (checkpoints, metrics.jsonl, ...) are now in "
        f"previous/{aside.name}/, where nothing resumes from them"
    )
    assert sorted(p.name for p in aside.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "confusion.png",
        "curves.png",
        "metrics.jsonl",
    ]
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == [
        "last.pt",
        "step-00000006.pt",
        "step-00000008.pt",
    ]
    assert read_metrics(aside) == first
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.pt",
        "step-00000002.pt",
        "step-00000004.pt",
    ]

    code, out, err = train_here(*args, "train.epochs=2", "train.lr=0.01")
    assert code == 0, err
    assert "resumed at step 4" in out
    assert [(r["epoch"], r["step"], r["lr"]) for r in epochs(read_metrics(run_dir))] == [
        (0, 4, 0.01),
        (1, 8, 0.01),
    ]
    assert not (tmp_path / "~").exists()


# ---- divergence ----------------------------------------------------------------------------------------
def test_divergence_stops_with_one_line_and_writes_no_non_finite_checkpoint(tmp_path, data_root):
    args = ("train.lr=1e6", "log.every_steps=1", "checkpoint.every_steps=1", "data.train_subset=256")
    code, _, err = train_here(*small_run(data_root, tmp_path, "nan", *args))
    assert code == 1
    line = one_line(err)
    assert line.startswith("error: training diverged at step ") and "train.lr (now 1e+06)" in line
    for path in (tmp_path / "nan" / "checkpoints").glob("*.pt"):  # the steps before it: finite, loadable
        assert checkpoint.finite(checkpoint.load(path))


def test_non_finite_checkpoint_is_refused_by_resume_and_evaluate(tmp_path, trained, data_root):
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    state["model"]["0.0.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    code, _, err = call(evaluate.main, "--checkpoint", str(bad), f"data.root={data_root}")
    assert code == 2 and "weights are not finite" in one_line(err)
    code, _, err = train_here(
        *small_run(data_root, tmp_path, "r", f"checkpoint.resume={bad}", "train.epochs=2")
    )
    assert code == 2 and "weights are not finite" in one_line(err)
    assert not (tmp_path / "r").exists()  # not even an empty folder holding the lock


# ---- resuming a damaged or changed run -----------------------------------------------------------------
def test_resume_from_only_last_pt_with_a_changed_config(tmp_path, trained, data_root):
    """Step files deleted by hand: last.pt is the newest; a changed LR and epochs apply, a changed seed is kept,
    and config.yaml and the checkpoint say what ran."""
    run_dir = tmp_path / "t"
    shutil.copytree(trained, run_dir)
    for p in checkpoint.step_files(run_dir / "checkpoints"):
        p.unlink()
    code, out, err = train_here(
        *small_run(data_root, tmp_path, "t", "train.epochs=2", "train.lr=0.1", "run.seed=3")
    )
    assert code == 0, err
    assert "resumed at step 8" in out
    assert "config: train.epochs 1 -> 2: applied" in out
    assert "config: train.lr 0.05 -> 0.1: applied" in out
    assert "config: run.seed 0 -> 3: kept: " in out
    assert [(r["epoch"], r["lr"]) for r in epochs(read_metrics(run_dir))] == [(0, 0.05), (1, 0.1)]
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")["config"]
    for cfg in (written, saved):
        assert (cfg["train"]["lr"], cfg["train"]["epochs"], cfg["run"]["seed"]) == (0.1, 2, 0)


def test_a_resume_that_cannot_apply_a_change_or_load_a_checkpoint_stops(tmp_path, trained, data_root):
    run_dir = tmp_path / "t"
    shutil.copytree(trained, run_dir)
    before = (run_dir / "config.yaml").read_text()
    code, out, err = train_here(*small_run(data_root, tmp_path, "t", "model.stem=cifar", "data.resize=32"))
    assert code == 2
    assert "config: model.stem 'imagenet' -> 'cifar': refused" in out
    assert "cannot resume with a changed data.resize, model.stem" in one_line(err)
    assert (run_dir / "config.yaml").read_text() == before  # nothing rewritten
    # only damaged checkpoints: never a fresh start over them without checkpoint.resume=never
    for p in (run_dir / "checkpoints").glob("*.pt"):
        p.unlink()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    code, _, err = train_here(*small_run(data_root, tmp_path, "t", "train.epochs=2"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert "none of them loads" in lines[-1] and "checkpoint.resume=never" in lines[-1], err
    assert (run_dir / "config.yaml").read_text() == before


def test_a_refused_resume_leaves_no_run_directory(tmp_path, trained, data_root):
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    torch.save(state, tmp_path / "good.pt")
    state["model"]["0.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    for ckpt, refusal in (("good.pt", "cannot resume with a changed model.stem"), ("nan.pt", "not finite")):
        resume = f"checkpoint.resume={tmp_path / ckpt}"
        code, _, err = train_here(*small_run(data_root, tmp_path / "runs", "new", resume, "model.stem=cifar"))
        assert code == 2 and refusal in err.strip().splitlines()[-1]
        assert not (tmp_path / "runs").exists()


def test_torn_metrics_lines(tmp_path, capsys):
    from resnet_dist.loggers import MetricsError, truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"kind": "step", "step": s}) for s in (1, 2, 3)]
    path.write_text("\n".join(good) + '\n{"kind": "st')  # a crash in the middle of the last line
    truncate_jsonl(path, 2)
    assert path.read_text().splitlines() == good[:2]
    assert "dropped the torn last line" in capsys.readouterr().err
    path.write_text(good[0] + "\n{oops\n" + good[1] + "\n")
    with pytest.raises(MetricsError, match="line 2 is not JSON"):
        truncate_jsonl(path, 5)


# ---- Ctrl-C -----------------------------------------------------------------------------------------------
@pytest.mark.processes
def test_ctrl_c_saves_and_a_second_one_aborts_at_once(tmp_path, data_root):
    """Ctrl-C saves at the next step and exits 0; resumed, a second Ctrl-C stops at once (130), before the
    checkpoint the first one asked for. The runs are held where each signal must land (tests/held.py)."""
    args = small_run(data_root, tmp_path, "c", "train.epochs=3", "log.every_steps=1")
    ckpts = tmp_path / "c" / "checkpoints"
    proc = launch(HELD + args, **hold(tmp_path / "first", "step 1 until signal"))
    wait_for(marker(tmp_path / "first", "step 1"), proc)  # training: its first step done
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "interrupted: saving a checkpoint at the next step (Ctrl-C again to stop at once)"
    ]
    saved = int(out.split("preempted: checkpoint saved at step ")[1].split(";")[0])
    assert saved == 2 and checkpoint.load(ckpts / "last.pt")["progress"]["global_step"] == saved

    held = tmp_path / "second"
    proc = launch(HELD + args, **hold(held, f"step {saved + 1} until signal", "stop"))
    wait_for(marker(held, f"step {saved + 1}"), proc)  # the resumed run trains
    proc.send_signal(signal.SIGINT)
    wait_for(
        marker(held, "stop"), proc
    )  # the first Ctrl-C stopped the loop; its checkpoint is not written yet
    before = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert [line for line in err.splitlines() if line.strip()] == [
        "interrupted: saving a checkpoint at the next step (Ctrl-C again to stop at once)",
        "interrupted twice: stopping without a checkpoint",
    ]
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()} == before  # no checkpoint written


# ---- the disk fills up -----------------------------------------------------------------------------------
@pytest.mark.processes
def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, data_root):
    """2 ranks; a 70 MB tmpfs holds one 45 MB checkpoint, not two: rank 0 says why, rank 1 does not blame a
    dead peer, and the first checkpoint stays loadable."""
    with tmpfs(tmp_path / "small", "size=70m") as disk:
        port = free_port()
        args = small_run(
            data_root,
            disk,
            "full",
            "checkpoint.every_steps=2",
            "train.epochs=1",
            "data.train_subset=256",
            "dist.timeout_s=30",
        )
        procs = [
            launch(
                TRAIN + args, RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            )
            for r in (0, 1)
        ]
        results = [p.communicate(timeout=240) for p in procs]
        assert [p.returncode for p in procs] == [1, 1], results
        err0 = [line for line in results[0][1].splitlines() if line.strip()]
        assert err0 == [
            "error: could not write step-00000004: No space left on device; step-00000002 is kept"
        ]
        assert "another rank died" not in results[1][1] and "Traceback" not in results[1][1], results[1][1]
        kept = checkpoint.load(disk / "full" / "checkpoints" / "step-00000002.pt")
        assert kept["progress"]["global_step"] == 2


# ---- checked before anything is written --------------------------------------------------------------------
def test_an_unusable_run_dir_is_refused_before_anything_is_written(tmp_path, data_root):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = train_here(*small_run(data_root, afile, "x"))
    assert code == 2 and "is a file, not a folder" in one_line(err)
    with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        code, _, err = train_here(*small_run(data_root, ro / "runs", "x"))
        assert code == 2 and "Read-only file system" in one_line(err)


def _damaged_copy(data_root: Path, to: Path) -> Path:
    shutil.copytree(data_root, to)
    labels = to / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1] + bytes([200]))
    return to


@pytest.mark.parametrize(
    "case",
    [
        "data.root is a file",
        "data.root is damaged",
        "data.root is read-only",
        "run.name of 300 characters",
        ".lock is a folder",
        ".lock is not a lock",
        "checkpoints/last.pt is a folder",
        "a step file is a folder",
    ],
)
def test_found_before_anything_is_created_exit_2_with_one_line(tmp_path, data_root, case):
    """The data, then the run directory: each problem in one line naming what to change, exit 2, and the
    folders as they were (no run directory made, nothing added to an existing one)."""
    runs, name, root = tmp_path / "runs", "x", data_root
    (tmp_path / "afile").write_text("x")
    in_the_way = {
        ".lock is a folder": ".lock/",
        ".lock is not a lock": ".lock",
        "checkpoints/last.pt is a folder": "checkpoints/last.pt/",
        "a step file is a folder": "checkpoints/step-00000004.pt/",
    }.get(case)
    if in_the_way:
        path = runs / name / in_the_way
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if in_the_way.endswith("/") else path.write_text("my notes\n")
    if case == "data.root is a file":
        root = tmp_path / "afile"
    if case == "data.root is damaged":
        root = _damaged_copy(data_root, tmp_path / "damaged")
    if case == "run.name of 300 characters":
        name = "n" * 300
    with contextlib.ExitStack() as stack:
        if case == "data.root is read-only":
            root = stack.enter_context(tmpfs(tmp_path / "ro", "size=1m,ro")) / "data"
        before = tree(tmp_path)
        code, out, err = train_here(*small_run(root, runs, name))
        assert tree(tmp_path) == before
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    want = {
        "data.root is a file": f"error: data.root {root} cannot hold the data: {root} is a file, not a folder",
        "data.root is damaged": f"error: data.root {root}: t10k-labels-idx1-ubyte is not the published file",
        "data.root is read-only": f"error: data.root {root} cannot hold the data: cannot write in {root.parent} "
        "(Read-only file system)",
        "run.name of 300 characters": "error: the folder name 'nnnnnnnnnnnnnnnnnnnn...' is 300 bytes long",
        ".lock is a folder": f"error: {runs / name / '.lock'} is a folder or a link to nothing, not a file",
        ".lock is not a lock": f"error: {runs / name / '.lock'} is not a lock file of resnet_dist",
        "checkpoints/last.pt is a folder": f"error: {runs / name / 'checkpoints/last.pt'} is a folder",
        "a step file is a folder": f"error: {runs / name / 'checkpoints/step-00000004.pt'} is a folder",
    }[case]
    assert lines[0].startswith(want), lines[0]


# ---- the rendezvous ------------------------------------------------------------------------------------------
BUSY = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
conns = []
while True:
    conns.append(s.accept()[0])  # accepts, never answers: not rank 0's store
"""


@pytest.mark.processes
def test_busy_master_port_and_a_peer_that_never_joins(tmp_path):
    port, lonely = free_port(), free_port()
    squatter = subprocess.Popen([PY, "-c", BUSY, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline().strip() == "listening"
        args = [f"run.dir={tmp_path}", "run.name=x", "dist.timeout_s=5"]
        env = {"WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1"}
        t0 = time.time()
        procs = [launch(TRAIN + args, RANK=r, LOCAL_RANK=r, MASTER_PORT=port, **env) for r in (0, 1)]
        procs.append(
            launch(TRAIN + args, RANK=0, LOCAL_RANK=0, MASTER_PORT=lonely, **env)
        )  # its peer never comes
        results = [p.communicate(timeout=120) for p in procs]
        assert time.time() - t0 < 5 + 60
    finally:
        squatter.kill()
    assert [p.returncode for p in procs] == [2, 2, 2], results
    lines = [[line for line in err.splitlines() if line.strip()] for _, err in results]
    assert all(len(x) == 1 for x in lines), lines
    assert "the port is in use by another program" in lines[0][0]
    assert "got no answer from rank 0's rendezvous" in lines[1][0]
    assert "did not all meet" in lines[2][0]
    assert not (tmp_path / "x").exists()
