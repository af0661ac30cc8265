"""The real program, end to end: a single process and torchrun with 2 gloo ranks on real data."""

import json

import pytest
import torch

from resnet_dist import checkpoint
from resnet_dist.evaluate import CLASS_KEYS

from .helpers import PY, call, epochs, read_metrics, run, small_run, torchrun, without_timing

EPOCH_KEYS = {
    "epoch",
    "step",
    "world_size",
    "train/loss",
    "train/acc",
    "test/loss",
    "test/acc",
    "test/samples",
    "images_per_s",
}


def check_run(run_path, world_size, n_epochs=2, test_samples=999):
    recs = read_metrics(run_path)
    ep = epochs(recs)
    assert [r["epoch"] for r in ep] == list(range(n_epochs))  # exactly one record per epoch: one writer
    for r in ep:
        assert EPOCH_KEYS <= r.keys()
        assert r["world_size"] == world_size and r["test/samples"] == test_samples
        assert 0 <= r["test/acc"] <= 1 and r["images_per_s"] > 0
    steps = [r["step"] for r in recs]
    assert steps == sorted(steps) and len(steps) == len(set(s for s in steps)) + len(
        ep
    )  # epoch rows repeat a step
    assert (run_path / "config.yaml").is_file() and (run_path / "checkpoints" / "last.pt").is_file()
    return ep


@pytest.mark.processes
def test_single_process_run(tmp_path, data_root):
    proc = run([PY, "-m", "resnet_dist.train", *small_run(data_root, tmp_path, "one")])
    assert proc.returncode == 0, proc.stderr
    assert "launcher=none world_size=1" in proc.stdout
    assert "it/s" not in proc.stdout + proc.stderr  # not a terminal: plain lines, no progress bar
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("epoch ")] == [
        "epoch 1 step 8",
        "epoch 2 step 16",
    ]
    ep = check_run(tmp_path / "one", world_size=1)
    assert ep[-1]["step"] == 2 * 512 // 64


@pytest.mark.processes
def test_torchrun_two_ranks_with_the_fast_path_options(tmp_path, data_root):
    """torchrun with 2 gloo ranks, and EMA, flip TTA, a small DDP bucket and the bf16 gradient-compression hook
    on: rank 0 alone speaks, each epoch is logged once, the lock goes with the run; then `evaluate` under
    torchrun computes what training logged."""
    proc = run(
        torchrun(2)
        + small_run(
            data_root,
            tmp_path,
            "fast",
            "train.ema_decay=0.9",
            "train.tta_flip=true",
            "dist.bucket_mb=1",
            "dist.grad_compression=bf16",
            "train.momentum=0.9",
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("resnet_dist: launcher=torchrun world_size=2") == 1  # only rank 0 speaks
    assert proc.stdout.count("epoch 2 step") == 1
    ep = check_run(tmp_path / "fast", world_size=2)
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == [  # the lock went with the run
        "checkpoints",
        "config.yaml",
        "confusion.png",
        "curves.png",
        "metrics.jsonl",
    ]
    state = checkpoint.load(tmp_path / "fast" / "checkpoints" / "last.pt")
    assert state["ema"] is not None and int(state["ema"]["n_averaged"]) == ep[-1]["step"]
    assert any(
        not torch.equal(v, state["model"][k])
        for k, v in state["ema"]["weights"].items()
        if v.is_floating_point()
    )
    # what training logged is what `evaluate` computes from the checkpoint on the same ranks: every rank
    # evaluated with rank 0's BatchNorm statistics (each rank's drift apart), the ones the checkpoint holds
    proc = run(
        torchrun(2, module="resnet_dist.evaluate")
        + ["--checkpoint", str(tmp_path / "fast" / "checkpoints" / "last.pt"), f"data.root={data_root}"]
    )
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in ("test/acc", "test/loss", *(f"test/acc/{c}" for c in CLASS_KEYS)):
        assert evaluated[k] == ep[-1][k], k


@pytest.mark.processes
def test_progress_bar_on_a_terminal(tmp_path, data_root):
    import os
    import pty
    import subprocess

    from .helpers import REPO, clean_env

    args = [
        PY,
        "-m",
        "resnet_dist.train",
        *small_run(data_root, tmp_path, "tty", "train.epochs=1", "data.train_subset=256"),
    ]
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        args, cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    tty_out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, tty_out
    assert "epoch 1/1" in tty_out and "it/s" in tty_out  # tqdm's bar, on rank 0's terminal
    assert "epoch 1 step 4:" in tty_out  # and the epoch line


def test_run_names(tmp_path):
    from resnet_dist import config
    from resnet_dist.rundir import TORCHRUN_MARK, run_name

    cfg = config.load(None, [f"run.dir={tmp_path}"], world_size=1)
    assert run_name(config.load(None, ["run.name=mine"], world_size=1), {"SLURM_JOB_ID": "7"}) == "mine"
    assert run_name(cfg, {"SLURM_JOB_ID": "4242"}) == "4242"  # a requeued job finds its directory
    a, b = run_name(cfg, {}), run_name(cfg, {})
    assert a != b and a[:8].isdigit()  # timestamped, and two runs in the same second differ
    # torchrun restarted the workers: they find the directory of the first attempt by torchrun's run id
    for name, rid in (("older", "abc"), ("first", "xyz")):
        (tmp_path / name).mkdir()
        (tmp_path / name / TORCHRUN_MARK).write_text(rid)
    restarted = {"TORCHELASTIC_RUN_ID": "xyz", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert run_name(cfg, restarted) == "first"
    assert run_name(cfg, {**restarted, "TORCHELASTIC_RESTART_COUNT": "0"}) not in ("first", "older")


def test_small_per_rank_batch_warns_on_gpus_only():
    from resnet_dist.train import small_batch_warning

    assert small_batch_warning(torch.device("cpu"), 32, 2) is None
    assert small_batch_warning(torch.device("cuda"), 128, 4) is None
    assert "64 images per rank" in small_batch_warning(torch.device("cuda"), 64, 8)


def test_deterministic_runs_repeat_exactly_with_accumulation(tmp_path, data_root):
    """run.deterministic=true twice (with gradient accumulation), in this process: the same metrics.jsonl,
    timing aside."""
    from resnet_dist import train

    records = []
    for name in ("d1", "d2"):
        args = ("run.deterministic=true", "train.accum_steps=2", "train.epochs=1", "data.flip=true")
        code, out, err = call(train.main, *small_run(data_root, tmp_path, name, *args, "data.erasing=0.3"))
        assert code == 0, err
        assert "deterministic=on accum_steps=2 " in out.splitlines()[0]
        records.append(without_timing(read_metrics(tmp_path / name)))
    assert records[0] == records[1] and len(records[0]) == 4  # steps 3, 6, 8 and the epoch


@pytest.mark.processes
def test_sync_bn_on_cpu_ranks_is_one_line(tmp_path, data_root):
    proc = run(torchrun(2) + small_run(data_root, tmp_path, "s", "model.sync_bn=true"), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("error: model.sync_bn=true needs GPUs") == 1, proc.stderr[
        -2000:
    ]  # rank 0 says it
    assert not (tmp_path / "s").exists()
