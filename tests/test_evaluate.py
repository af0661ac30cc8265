"""`python -m resnet_dist.evaluate`: a checkpoint's exact test metrics, the same on 1 and 3 ranks."""
import json

import pytest

from resnet_dist.trainer import CLASS_KEYS

from .conftest import PY, epochs, read_metrics, run, small_run, torchrun


def trained_run(tmp_path_factory, data_root):
    """One epoch, one process, W&B off: a run directory with its checkpoint, metrics.jsonl and PNGs.

    Trained once per session and shared with test_plots.py (a fixture imported into another module
    would be a second fixture, and train twice).
    """
    base = tmp_path_factory.getbasetemp() / "trained"
    if not (base / "t" / "checkpoints" / "last.pt").is_file():
        proc = run([PY, "-m", "resnet_dist.train", *small_run(data_root, base, "t", "train.epochs=1")])
        assert proc.returncode == 0, proc.stderr
    return base / "t"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    return trained_run(tmp_path_factory, data_root)


def evaluate_cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [PY, "-m", "resnet_dist.evaluate"]
    return torchrun(nproc, module="resnet_dist.evaluate")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_same_accuracy_on_1_and_3_ranks(trained, data_root, tmp_path):
    ckpt = trained / "checkpoints" / "last.pt"
    one = run(evaluate_cmd(1) + ["--checkpoint", str(ckpt), f"data.root={data_root}"])
    assert one.returncode == 0, one.stderr
    three = run(evaluate_cmd(3) + ["--checkpoint", str(ckpt), "--out", str(tmp_path), f"data.root={data_root}"])
    assert three.returncode == 0, three.stderr
    a, b = last_json(one.stdout), last_json(three.stdout)
    assert (a["world_size"], b["world_size"]) == (1, 3)
    assert {"test/acc", "test/loss", "test/samples", *(f"test/acc/{c}" for c in CLASS_KEYS)} <= a.keys()
    assert a["test/samples"] == b["test/samples"] == 999  # the checkpoint's data.test_subset
    for k in ("test/acc", *(f"test/acc/{c}" for c in CLASS_KEYS)):
        assert a[k] == b[k], k
    assert abs(a["test/loss"] - b["test/loss"]) < 1e-6
    (ep,) = epochs(read_metrics(trained))
    assert a["test/acc"] == ep["test/acc"]  # the same number training logged for this checkpoint
    assert "per-class accuracy" in one.stdout and "confusion matrix" in one.stdout
    assert three.stdout.count("per-class accuracy") == 1  # only rank 0 speaks

    saved = json.loads((ckpt.parent / "last.eval.json").read_text())  # default: next to the checkpoint
    assert saved["test/acc"] == a["test/acc"] and sum(map(sum, saved["confusion"])) == 999
    assert (ckpt.parent / "last.confusion.png").is_file() and (tmp_path / "last.confusion.png").is_file()
    assert json.loads((tmp_path / "last.eval.json").read_text())["confusion"] == saved["confusion"]


def test_overrides_apply(trained, data_root):
    proc = run(evaluate_cmd(1) + ["--checkpoint", str(trained / "checkpoints" / "last.pt"),
                                  f"data.root={data_root}", "data.test_subset=300", "data.eval_batch_size=64"])
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["test/samples"] == 300


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "/no/such/file.pt"], "no checkpoint file"),
    (["--checkpoint", "CKPT", "train.lrr=1"], "train.lrr"),
    (["--checkpoint", "CONFIG"], "not a valid checkpoint"),
])
def test_usage_errors_exit_2_with_one_line(trained, args, words):
    args = [a.replace("CKPT", str(trained / "checkpoints" / "last.pt")).replace("CONFIG", str(trained / "config.yaml"))
            for a in args]
    proc = run(evaluate_cmd(1) + args, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
