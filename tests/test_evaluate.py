"""Exact evaluation: the same numbers on 1, 2 and 3 ranks, in real gloo groups, and `python -m resnet_dist.evaluate`
on a trained checkpoint."""

import json
import shutil

import pytest
import torch

from resnet_dist import evaluate
from resnet_dist.config import ModelConfig, load
from resnet_dist.evaluate import CLASS_KEYS, Evaluator
from resnet_dist.fashion_mnist import load_split
from resnet_dist.model import build_model

from .helpers import call, epochs, exit_code, in_gloo_group, read_metrics, run, torchrun
from .test_trainer import CPU_ENV


def evaluate_cmd(nproc: int) -> list[str]:
    return torchrun(nproc, module="resnet_dist.evaluate")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.processes
def test_same_accuracy_on_1_and_3_ranks(trained, data_root, tmp_path):
    """One process (this one) and torchrun's three."""
    ckpt = tmp_path / "ck" / "last.pt"
    ckpt.parent.mkdir()
    shutil.copy(trained / "checkpoints" / "last.pt", ckpt)
    code, one, err = call(evaluate.main, "--checkpoint", str(ckpt), f"data.root={data_root}")
    assert code == 0, err
    out = tmp_path / "out"
    three = run(evaluate_cmd(3) + ["--checkpoint", str(ckpt), "--out", str(out), f"data.root={data_root}"])
    assert three.returncode == 0, three.stderr
    a, b = last_json(one), last_json(three.stdout)
    assert (a["world_size"], b["world_size"]) == (1, 3)
    assert {"test/acc", "test/loss", "test/samples", *(f"test/acc/{c}" for c in CLASS_KEYS)} <= a.keys()
    assert a["test/samples"] == b["test/samples"] == 999  # the checkpoint's data.test_subset
    for k in ("test/acc", *(f"test/acc/{c}" for c in CLASS_KEYS)):
        assert a[k] == b[k], k
    assert abs(a["test/loss"] - b["test/loss"]) < 1e-6
    (ep,) = epochs(read_metrics(trained))
    assert a["test/acc"] == ep["test/acc"]  # the same number training logged for this checkpoint
    assert "per-class accuracy" in one and "confusion matrix" in one
    assert three.stdout.count("per-class accuracy") == 1  # only rank 0 speaks

    saved = json.loads((ckpt.parent / "last.eval.json").read_text())  # default: next to the checkpoint
    assert saved["test/acc"] == a["test/acc"] and sum(map(sum, saved["confusion"])) == 999
    assert (ckpt.parent / "last.confusion.png").is_file() and (out / "last.confusion.png").is_file()
    assert json.loads((out / "last.eval.json").read_text())["confusion"] == saved["confusion"]


def test_overrides_apply(trained, data_root, tmp_path):
    ckpt = str(trained / "checkpoints" / "last.pt")
    args = [
        "--out",
        str(tmp_path),
        f"data.root={data_root}",
        "data.test_subset=300",
        "data.eval_batch_size=64",
    ]
    code, out, err = call(evaluate.main, "--checkpoint", ckpt, *args)
    assert code == 0, err
    result = last_json(out)
    assert result["test/samples"] == 300
    # what the command changed, as applied, is part of the result
    assert result["overrides"] == {
        "data.root": str(data_root),
        "data.test_subset": 300,
        "data.eval_batch_size": 64,
    }


@pytest.mark.parametrize(
    "override",
    [
        "data.resize=96",
        "model.stem=cifar",
        "model.num_classes=12",
        "train.tta_flip=true",
        "train.precision=bf16",
    ],
)
def test_overrides_that_change_what_is_evaluated_are_refused(trained, tmp_path, override, capsys):
    """Only the test data and how fast it is read may change: the model, the input size, TTA and precision
    are the checkpoint's (the same rule as export's)."""
    from resnet_dist import export

    ckpt = str(trained / "checkpoints" / "last.pt")
    for main, tool in ((evaluate.main, "evaluate"), (export.main, "export")):
        code = exit_code(main, ["--checkpoint", ckpt, "--out", str(tmp_path), override])
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        key = override.partition("=")[0]
        assert code == 2 and line.startswith(f"error: override '{key}': {tool} takes only data.root")
        assert not captured.out
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, words",
    [
        (["--checkpoint", "/no/such/file.pt"], "no checkpoint file"),
        (["--checkpoint", "CKPT", "train.lrr=1"], "train.lrr"),
        (["--checkpoint", "CONFIG"], "not a valid checkpoint (not a file that torch.save wrote)"),
    ],
)
def test_usage_errors_exit_2_with_one_line(trained, args, words):
    args = [
        a.replace("CKPT", str(trained / "checkpoints" / "last.pt")).replace(
            "CONFIG", str(trained / "config.yaml")
        )
        for a in args
    ]
    code, _, err = call(evaluate.main, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and words in err, err


N_TEST = 1001  # divides by neither 2 nor 3: shards have unequal sizes


def _evaluate_in_group(env, raw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(stem="imagenet"))
    # a few BatchNorm statistics from training mode, so eval mode is not the identity
    x, y = load_split(raw, "test", N_TEST)
    model.train()
    with torch.no_grad():
        model((x[:256].float() / 255 - 0.286) / 0.353)
    evaluator = Evaluator.from_config(load(None, ["data.eval_batch_size=100"], world_size=1), env.device)
    return evaluator.evaluate(model, x, y, env)


@pytest.mark.processes
def test_evaluation_is_identical_for_1_2_and_3_ranks(data_root):
    raw = data_root / "FashionMNIST" / "raw"
    by_world = {w: in_gloo_group(_evaluate_in_group, w, raw) for w in (2, 3)}
    by_world[1] = [_evaluate_in_group(CPU_ENV, raw)]  # one process: this one, no process group
    ref = by_world[1][0]
    assert ref["test/samples"] == N_TEST
    assert sum(map(sum, ref["confusion"])) == N_TEST
    for w, per_rank in by_world.items():
        for rank, res in enumerate(per_rank):  # every rank holds the global result
            assert res["test/samples"] == N_TEST, (w, rank)
            assert res["test/acc"] == ref["test/acc"], (w, rank)
            assert res["confusion"] == ref["confusion"], (w, rank)
            assert abs(res["test/loss"] - ref["test/loss"]) < 1e-6, (w, rank)


def test_predict_normalizes_and_averages_the_mirror_with_flip_tta():
    from resnet_dist.data import normalize

    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    x = normalize(images, None)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
    cfg = load(None, [], world_size=1)
    assert torch.allclose(Evaluator.from_config(cfg, torch.device("cpu")).predict(model, images), plain)
    cfg.train.tta_flip = True
    assert torch.allclose(
        Evaluator.from_config(cfg, torch.device("cpu")).predict(model, images), (plain + mirrored) / 2
    )


def test_out_that_cannot_be_a_folder_exits_2_before_evaluating(trained, data_root, tmp_path, capsys):
    """--out naming a file, a folder inside a file, /proc, or the result's own name taken by a folder: one
    line, exit 2, nothing evaluated or written (the line comes before any evaluation output)."""
    ckpt = trained / "checkpoints" / "last.pt"
    a_file = tmp_path / "results.txt"
    a_file.write_text("the user's file\n")
    (tmp_path / "taken" / "last.eval.json").mkdir(parents=True)
    for out, words in [
        (a_file, f"--out {a_file}: {a_file} is a file, not a folder"),
        (a_file / "sub", f"{a_file} is a file, not a folder"),
        ("/proc/resnet_dist_eval", "cannot write in /proc"),
        (tmp_path / "taken", "last.eval.json is a folder"),
    ]:
        code = exit_code(
            evaluate.main, ["--checkpoint", str(ckpt), "--out", str(out), f"data.root={data_root}"]
        )
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert code == 2 and line.startswith("error: ") and words in line, line
        assert captured.out == ""  # before evaluating: no report
    assert a_file.read_text() == "the user's file\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["last.eval.json", "results.txt", "taken"]


def test_unusable_data_root_exits_2_naming_it_before_evaluating(trained, tmp_path, capsys):
    """A data.root that is a file, lies inside one, or cannot be made (and the test set is not prepared
    there): one line naming data.root, exit 2, nothing evaluated or written; export's verification alike."""
    from resnet_dist import export

    a_file = tmp_path / "data.txt"
    a_file.write_text("not a folder\n")
    ckpt = str(trained / "checkpoints" / "last.pt")
    out = tmp_path / "out"
    for root, words in [
        (a_file, f"{a_file} is a file, not a folder"),
        (a_file / "sub", f"{a_file} is a file, not a folder"),
        ("/proc/resnet_dist_data", "cannot write in /proc"),
    ]:
        for main in (evaluate.main, export.main):
            code = exit_code(
                main, ["--checkpoint", ckpt, "--out", str(out), f"data.root={root}", "data.test_subset=10"]
            )
            captured = capsys.readouterr()
            (line,) = captured.err.strip().splitlines()
            assert code == 2 and line.startswith(f"error: data.root {root} cannot hold the data: ")
            assert words in line and not captured.out, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (not JSON): a null must stay null."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


# the first 5 test images are of classes 9, 2, 1, 1, 6: the other six classes have no image
PRESENT = ("ankle_boot", "pullover", "trouser", "shirt")


def test_a_class_without_test_images_has_null_accuracy(trained, data_root, tmp_path, capsys):
    ckpt = str(trained / "checkpoints" / "last.pt")
    args = ["--checkpoint", ckpt, "--out", str(tmp_path), f"data.root={data_root}", "data.test_subset=5"]
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    result = strict_json(out.strip().splitlines()[-1])
    saved = strict_json((tmp_path / "last.eval.json").read_text())
    for key in CLASS_KEYS:
        if key in PRESENT:
            assert isinstance(result[f"test/acc/{key}"], float), key
        else:
            assert result[f"test/acc/{key}"] is None and saved[f"test/acc/{key}"] is None, key
    assert "  Coat         no images  (0/0)" in out.splitlines()


def test_null_accuracies_through_every_logger(data_root, tmp_path, capsys):
    """A real (tiny) training run evaluating 5 test images: metrics.jsonl holds null for the six classes
    without an image, the console line and the plots work (the confusion matrix says "no images"), and
    W&B and TensorBoard get no point for those keys (a chart cannot show "no value")."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from resnet_dist import plots
    from resnet_dist.data import load_splits
    from resnet_dist.distributed import DistEnv
    from resnet_dist.loggers import ConsoleLogger, JsonlLogger, MultiLogger
    from resnet_dist.tensorboard_logger import TensorBoardLogger
    from resnet_dist.trainer import Trainer
    from resnet_dist.wandb_logger import WandbLogger

    class WandbRun:  # what WandbLogger sends to a W&B run, recorded
        id, dir, logged = "abc", str(tmp_path / "wandb" / "run"), []

        def log(self, data, step):
            self.logged.append(data)

    cfg = load(
        None,
        [f"data.root={data_root}", "data.train_subset=16", "data.test_subset=5", "data.resize=8"]
        + ["train.batch_size=8", "train.epochs=1", "log.every_steps=1"],
        world_size=1,
    )
    env = DistEnv(
        rank=0, local_rank=0, world_size=1, launcher="none", device=torch.device("cpu"), backend=None
    )
    wb = WandbRun()
    tb = TensorBoardLogger(SummaryWriter(str(tmp_path / "tb")))
    logger = MultiLogger(ConsoleLogger(), JsonlLogger(tmp_path / "metrics.jsonl"), tb, WandbLogger(wb, True))
    trainer = Trainer(cfg, env, load_splits(cfg.data, env.device), tmp_path, logger)
    trainer.fit()
    logger.close()

    (record,) = [
        r
        for r in map(strict_json, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "epoch"
    ]
    absent = [k for k in CLASS_KEYS if k not in PRESENT]
    assert all(record[f"test/acc/{k}"] is None for k in absent) and all(
        isinstance(record[f"test/acc/{k}"], float) for k in PRESENT
    )
    assert "(5 images)" in capsys.readouterr().out  # the console's epoch line
    epoch_logged = wb.logged[-1]
    assert "test/acc" in epoch_logged and not any(f"test/acc/{k}" in epoch_logged for k in absent)
    assert all(f"test/acc/{k}" in epoch_logged for k in PRESENT)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "test/acc" in tags and not any(f"test/acc/{k}" in tags for k in absent)

    written = plots.write_run_plots(tmp_path, trainer.history)
    assert [p.name for p in written] == ["curves.png", "confusion.png"]
    fig = plots.confusion_figure(trainer.history[-1]["confusion"])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert (
        labels[4] == "Coat (no images)"
        and labels[9] == "Ankle boot"
        and sum("no images" in t for t in labels) == 6
    )
