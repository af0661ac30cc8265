"""W&B on rank 0, read back from the `.wandb` files: one run per job, continued on resume, never fatal, no key leaks."""

import json
import shutil

import pytest
import torch

from resnet_dist import config, wandb_logger
from resnet_dist.evaluate import CLASS_KEYS

from .helpers import PY, epochs, free_port, read_metrics, run, small_run, torchrun
from .wandb_reader import read_run, wandb_files

SWEEP_RUN = "agentrun1"  # the id `wandb agent` gives a trial (WANDB_RUN_ID)
FAKE_KEY = "0123456789abcdef0123456789abcdef0fa4e5ee"  # 40 characters, like a real key


def test_mode_resolution(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "none")}
    assert wandb_logger.resolve_mode("auto", no_netrc) == "offline"
    assert wandb_logger.resolve_mode("auto", {**no_netrc, "WANDB_API_KEY": FAKE_KEY}) == "online"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert wandb_logger.resolve_mode("auto", {"NETRC": str(netrc)}) == "online"
    assert (
        wandb_logger.resolve_mode("auto", {"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example"})
        == "offline"
    )
    assert wandb_logger.resolve_mode("online", {"WANDB_MODE": "offline"}) == "offline"  # the environment wins
    assert wandb_logger.resolve_mode("offline", {"WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_logger.resolve_mode("disabled", {}) == "disabled"
    closed = {"WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    assert "cannot reach" in wandb_logger.unreachable(closed, timeout_s=2)


def test_wandb_config_keys():
    cfg = config.load(
        None, ["log.wandb.tags=[baseline, 42]", "log.wandb.group=g", "log.wandb.name=n"], world_size=1
    )
    assert cfg.log.wandb.tags == ["baseline", "42"] and cfg.log.wandb.mode == "auto"
    assert (cfg.log.wandb.group, cfg.log.wandb.name) == ("g", "n")
    for bad in ("log.wandb.tags=solo", "log.wandb.tags=[[1]]", "log.wandb.mode=cloud"):
        with pytest.raises(config.ConfigError, match="log.wandb"):
            config.load(None, [bad], world_size=1)


def epoch_rows(history):
    return [h for h in history if "test/acc" in h]


@pytest.fixture(scope="module")
def offline_two_ranks(tmp_path_factory, data_root):
    """One epoch on 2 ranks, W&B offline, started as `wandb agent` starts a sweep's trial: WANDB_RUN_ID and
    WANDB_SWEEP_ID set, the trial's values as KEY=VALUE overrides (sweeps/lr_wd.yaml's parameters)."""
    base = tmp_path_factory.mktemp("wandb")
    trial = ["train.lr=0.0731", "train.weight_decay=0.00042"]
    proc = run(
        torchrun(2) + small_run(data_root, base, "wb", "train.epochs=1", "log.wandb.tags=[ci]", *trial),
        WANDB_MODE="offline",
        WANDB_RUN_ID=SWEEP_RUN,
        WANDB_SWEEP_ID="sweep0001",
    )
    assert proc.returncode == 0, proc.stderr
    return base / "wb", proc


@pytest.mark.processes
def test_two_ranks_offline_is_one_run_matching_metrics_jsonl(offline_two_ranks):
    run_path, proc = offline_two_ranks
    files = wandb_files(run_path)
    assert len(files) == 1, files  # rank 1 logged nothing
    assert proc.stdout.count("wandb sync ") == 1 and str(files[0].parent) in proc.stdout
    wb = read_run(files[0])
    ckpt = torch.load(run_path / "checkpoints" / "last.pt", weights_only=True)
    assert (
        wb.id == ckpt["wandb_id"] == SWEEP_RUN
    )  # the agent's run; the checkpoint knows which run to continue
    assert (wb.config["train"]["lr"], wb.config["train"]["weight_decay"]) == (0.0731, 0.00042)  # the trial's
    assert wb.config["train"] == ckpt["config"]["train"] and wb.config["log"]["wandb"]["tags"] == ["ci"]
    assert wb.exit_code == 0

    recs = read_metrics(run_path)
    steps = [r for r in recs if r["kind"] == "step"]
    assert all(r["images_per_s"] > 0 for r in steps)
    by_step = {h["_step"]: h for h in wb.history}
    for r in steps:  # W&B steps are the trainer's steps
        assert by_step[r["step"]]["lr"] == r["lr"]
    (ep,) = epochs(recs)
    (row,) = epoch_rows(wb.history)
    assert row["_step"] == ep["step"] and row["epoch"] == ep["epoch"] and row["world_size"] == 2
    for k in ("test/acc", "test/loss", "test/samples", *(f"test/acc/{c}" for c in CLASS_KEYS)):
        assert row[k] == ep[k], k
    assert row["train/epoch_loss"] == ep["train/loss"] and row["train/epoch_acc"] == ep["train/acc"]

    # the confusion-matrix chart's table holds the epoch's confusion matrix
    table = json.loads((files[0].parent / "files" / row["test/confusion_table"]["path"]).read_text())
    assert len(table["data"]) == 100 and sum(n for _, _, n in table["data"]) == 999
    assert [[n for _, _, n in table["data"][i * 10 : (i + 1) * 10]] for i in range(10)] == ckpt["history"][
        -1
    ]["confusion"]
    # the misclassified panel: images with their true and predicted labels
    panel = row["test/misclassified"]
    assert 0 < panel["count"] <= 16 and all(
        c.startswith("true: ") and " / predicted: " in c for c in panel["captions"]
    )
    assert all((files[0].parent / "files" / f).is_file() for f in panel["filenames"])


@pytest.mark.processes
def test_resumed_run_continues_the_same_wandb_run(offline_two_ranks, tmp_path, data_root):
    """Epoch 2 after a restart (here on 1 rank): the same W&B id, steps going on from the checkpoint's."""
    first, _ = offline_two_ranks
    shutil.copytree(first, tmp_path / "wb", symlinks=True)
    proc = run(
        [PY, "-m", "resnet_dist.train", *small_run(data_root, tmp_path, "wb", "train.epochs=2")],
        WANDB_MODE="offline",
    )
    assert proc.returncode == 0, proc.stderr
    assert "resumed at step 8" in proc.stdout
    files = wandb_files(tmp_path / "wb")
    assert (
        len(files) == 2
    )  # offline, each process writes its own file of the same run: `wandb sync` joins them
    old, new = read_run(files[0]), read_run(files[1])
    assert (
        old.id
        == new.id
        == torch.load(tmp_path / "wb" / "checkpoints" / "last.pt", weights_only=True)["wandb_id"]
    )
    old_steps, new_steps = [h["_step"] for h in old.history], [h["_step"] for h in new.history]
    assert min(new_steps) > max(old_steps) == 8 and new_steps == sorted(new_steps) and max(new_steps) == 16
    ep = epochs(read_metrics(tmp_path / "wb"))
    (row,) = epoch_rows(new.history)
    assert [r["epoch"] for r in ep] == [0, 1] and row["epoch"] == 1 and row["test/acc"] == ep[1]["test/acc"]


def scan_for_key(paths, key=FAKE_KEY):
    leaks = []
    for p in paths:
        if p.is_file() and key.encode() in p.read_bytes():
            leaks.append(str(p))
    return leaks


@pytest.mark.processes
def test_online_without_a_server_trains_on_with_one_warning(tmp_path, data_root):
    proc = run(
        [PY, "-m", "resnet_dist.train", *small_run(data_root, tmp_path, "online", "train.epochs=1")],
        WANDB_MODE="online",
        WANDB_API_KEY=FAKE_KEY,
        WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "finished:" in proc.stdout
    warnings = [
        line for line in proc.stderr.splitlines() if "warning" in line.lower() or "error" in line.lower()
    ]
    assert len(warnings) == 1 and "logging offline" in warnings[0], proc.stderr
    assert FAKE_KEY not in proc.stdout + proc.stderr
    run_path = tmp_path / "online"
    (f,) = wandb_files(run_path)  # the offline fallback, ready for `wandb sync`
    assert read_run(f).id == torch.load(run_path / "checkpoints" / "last.pt", weights_only=True)["wandb_id"]
    assert scan_for_key(run_path.rglob("*")) == []  # config.yaml, checkpoints, metrics, every W&B file


FALLBACK = """
import sys
from pathlib import Path
from resnet_dist import config, wandb_logger
wandb_logger.unreachable = lambda *a, **k: None  # as behind a proxy: wandb.init itself has to fail
cfg = config.load(None, ["log.wandb.init_timeout_s=1"], world_size=1)
lg = wandb_logger.start(cfg, Path(sys.argv[1]), "fallback", "keepthis1")
lg.log({"kind": "step", "step": 3, "epoch": 0, "train/loss": 1.5, "lr": 0.1})
lg.close()
"""


@pytest.mark.processes
def test_wandb_init_failure_falls_back_to_offline_with_the_same_id(tmp_path):
    """wandb.init itself fails (server unreachable past init_timeout): one warning, an offline run, same id."""
    proc = run(
        [PY, "-c", FALLBACK, str(tmp_path)],
        WANDB_MODE="online",
        WANDB_API_KEY=FAKE_KEY,
        WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B online logging failed"), proc.stderr
    assert FAKE_KEY not in proc.stdout + proc.stderr
    (f,) = wandb_files(tmp_path)  # the failed online attempt left nothing behind
    wb = read_run(f)
    assert wb.id == "keepthis1" and [h["train/loss"] for h in wb.history] == [1.5]
    assert scan_for_key(tmp_path.rglob("*")) == []


def test_the_shipped_sweep_runs_the_trainer_with_valid_keys():
    import yaml

    from .helpers import REPO

    sweep = yaml.safe_load((REPO / "sweeps" / "lr_wd.yaml").read_text())
    assert sweep["method"] == "bayes" and sweep["metric"] == {"name": "test/acc", "goal": "maximize"}
    assert "launch/torchrun.sh" in sweep["command"] and sweep["command"][-1] == "${args_no_hyphens}"
    assert set(sweep["parameters"]) == {"train.lr", "train.weight_decay"}
    for key, spec in sweep["parameters"].items():  # each end of each range is a valid override
        for value in (spec["min"], spec["max"]):
            config.load(str(REPO / "configs" / "fast.yaml"), [f"{key}={value}"], world_size=1)
