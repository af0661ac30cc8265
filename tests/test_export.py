"""Use the trained model: `python -m resnet_dist.export` (safetensors, model card, ONNX verified with
onnxruntime), `python -m resnet_dist.predict` on image files, and the W&B model artifact of a finished run."""

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_dist import checkpoint, config, export, exportdir, files, predict, runners
from resnet_dist.data import normalize
from resnet_dist.evaluate import Evaluator, checkpoint_config, load_model
from resnet_dist.fashion_mnist import CLASSES, MEAN, STD, load_split, prepare
from resnet_dist.model import build_model

from .helpers import PY, call, epochs, exit_code, read_metrics, run, small_run
from .wandb_reader import read_run, wandb_files

CPU = torch.device("cpu")

# Runs a module as `python -m` does, with the export extra "not installed": importing onnx, onnxscript or
# onnxruntime fails as it does where they are missing. Everything else is the real code path.
WITHOUT_ONNX = """
import runpy, sys
class NoOnnx:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("onnx", "onnxscript", "onnxruntime"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoOnnx())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def ckpt_of(trained):
    return trained / "checkpoints" / "last.pt"


def reference(trained):
    """The checkpoint's model as `evaluate` builds and runs it."""
    state = checkpoint.load(ckpt_of(trained))
    cfg = checkpoint_config(state, ())
    return state, load_model(state, cfg, CPU).eval(), Evaluator.from_config(cfg, CPU)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The trained checkpoint exported (both formats), its ONNX verified on 200 real test images: (the folder,
    what the export printed). In-process: `python -m resnet_dist.export` runs in test_without_onnx."""
    out = tmp_path_factory.mktemp("export")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        args = ["--checkpoint", str(ckpt_of(trained)), "--out", str(out), "data.test_subset=200"]
        assert export.main(args) == 0
    return out, printed.getvalue()


def test_safetensors_weights_give_the_checkpoints_logits(trained, exported, data_root):
    from safetensors.torch import load_file

    out, _ = exported
    state, ref, _ = reference(trained)
    weights = load_file(out / "model.safetensors")  # no pickle: plain tensors
    saved = checkpoint.evaluated_weights(state)
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    fresh = build_model(config.from_dict({"model": state["config"]["model"]}).model)
    fresh.load_state_dict(weights)  # strict: every key, no extra one
    x = normalize(load_split(prepare(str(data_root)), "test", 64)[0], None)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ref(x))


def test_model_card(trained, exported):
    out, printed = exported
    card = json.loads((out / "model.json").read_text())
    state = checkpoint.load(ckpt_of(trained))
    assert card["model"] == state["config"]["model"] and card["model"]["stem"] == "imagenet"
    assert card["weights"] == "model" and card["tta_flip"] is False  # no EMA, no TTA in this run
    assert card["classes"] == list(CLASSES)
    inp = card["input"]
    assert (inp["channels"], inp["size"], inp["mean"], inp["std"]) == (1, 28, MEAN, STD)
    assert inp["light_on_dark"] is True and card["format"] == exportdir.FORMAT
    assert card["checkpoint"]["global_step"] == state["progress"]["global_step"] == 8
    assert card["checkpoint"]["epoch"] == state["progress"]["epoch"] == 1
    (ep,) = epochs(read_metrics(trained))
    assert card["last_test"] == {"acc": ep["test/acc"], "samples": 999, "epoch": 1}
    assert card["torch_version"] == torch.__version__

    onnx_card = card["onnx"]
    assert onnx_card["opset"] >= 18 and "dynamo=True" in onnx_card["exporter"]
    assert onnx_card["input"]["name"] == "image" and onnx_card["input"]["shape"] == ["batch", 1, 28, 28]
    v = onnx_card["verification"]
    assert v["images"] == 200 and v["passed"] is True
    assert v["top1_agreement"] >= 0.999 and v["max_abs_logit_diff"] <= 1e-3
    assert f"on 200 test images: max |logit difference| {v['max_abs_logit_diff']:.3g}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.safetensors"]
    assert card["files"] == ["model.safetensors", "model.onnx", "model.json"]
    umask = os.umask(0)
    os.umask(umask)
    for p in out.iterdir():  # as a plain open() makes them: safetensors alone would write 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_onnx_has_a_dynamic_batch(trained, exported):
    import onnx
    import onnxruntime as ort

    out, _ = exported
    graph = onnx.load(str(out / "model.onnx")).graph
    (inp,) = graph.input
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    _, ref, _ = reference(trained)
    for n in (1, 7):
        x = torch.randn(n, 1, 28, 28)
        (logits,) = session.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            assert logits.shape == (n, 10) and np.abs(logits - ref(x).numpy()).max() < 1e-3


def test_ema_weights_and_flip_tta_are_exported(trained, data_root, tmp_path):
    """A run with EMA and flip TTA: the export holds the EMA weights, and model.onnx computes the averaged
    logits of the image and its mirror, as `evaluate` does (the default folder: <run dir>/export)."""
    from safetensors.torch import load_file

    state = checkpoint.load(ckpt_of(trained))
    gen = torch.Generator().manual_seed(0)
    ema = {
        k: v + 0.01 * torch.randn(v.shape, generator=gen) if k.endswith(("weight", "bias")) else v
        for k, v in state["model"].items()
    }
    state["ema"] = {"weights": ema, "n_averaged": 8}
    state["config"]["train"]["tta_flip"] = True
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "last.pt")
    assert (
        export.main(["--checkpoint", str(tmp_path / "checkpoints" / "last.pt"), "data.test_subset=100"]) == 0
    )
    out = tmp_path / "export"
    card = json.loads((out / "model.json").read_text())
    assert card["weights"] == "ema" and card["tta_flip"] is True and card["onnx"]["verification"]["passed"]
    weights = load_file(out / "model.safetensors")
    assert all(torch.equal(weights[k], ema[k]) for k in ema) and weights.keys() == ema.keys()

    model = runners.model_from_card(card, weights)
    images = load_split(prepare(str(data_root)), "test", 50)[0]
    runner = runners.OnnxRunner(out / "model.onnx", card)
    with_tta = runners.TorchRunner(model, card).logits(images)
    without = runners.TorchRunner(model, {**card, "tta_flip": False}).logits(images)
    assert (runner.logits(images) - with_tta).abs().max() < 1e-3 < (with_tta - without).abs().max()


def corrupt_first_conv(src, dst):
    """Copy an ONNX file with its first convolution's weight shifted by 1.0 (the stem: every image changes)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1.0, init.name))
    onnx.save(model, str(dst))


def test_verification_fails_on_a_corrupted_onnx_weight(trained, exported, tmp_path, capsys):
    out, _ = exported
    corrupt_first_conv(out / "model.onnx", tmp_path / "model.onnx")
    before = (tmp_path / "model.onnx").read_bytes()
    args = ["--checkpoint", str(ckpt_of(trained)), "--out", str(tmp_path), "--verify-only"]
    code = exit_code(export.main, [*args, "data.test_subset=200"])
    captured = capsys.readouterr()
    assert code == 1 and not captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: ") and "does not compute what the checkpoint does" in line
    assert "on 200 test images" in line
    # --verify-only writes nothing: the corrupted file is still there as it was, nothing else appeared
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and (
        tmp_path / "model.onnx"
    ).read_bytes() == before

    # it fails on the difference; the exported file passed the same check on the same images (model.json)
    assert float(re.search(r"max \|logit difference\| (\S+) \(limit 0.001\)", line)[1]) > 1e-3
    good = json.loads((out / "model.json").read_text())["onnx"]["verification"]
    assert good["images"] == 200 and good["passed"] and good["max_abs_logit_diff"] <= 1e-3
    assert good["top1_agreement"] == 1.0


def test_a_failed_write_leaves_no_half_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the earlier export")

    def half_then_fail(p):
        p.write_bytes(b"half a fi")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_write(target, half_then_fail)  # how the export writes each of its files
    assert target.read_bytes() == b"the earlier export" and [p.name for p in tmp_path.iterdir()] == [
        target.name
    ]


def test_export_usage_errors_exit_2_with_one_line(trained, tmp_path, capsys):
    for args, words in [
        (["--checkpoint", str(tmp_path / "none.pt")], "no checkpoint file"),
        (["--checkpoint", str(trained / "config.yaml")], "not a valid checkpoint"),
        (["--checkpoint", str(ckpt_of(trained)), "train.lr=1"], "export takes only data.root"),
        (["--checkpoint", str(ckpt_of(trained)), "--format", "pdf"], "--format takes"),
        (["--checkpoint", str(ckpt_of(trained)), "--out", str(tmp_path), "--verify-only"], "no model.onnx"),
    ]:
        code = exit_code(export.main, args)
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and line.startswith("error: ") and words in line, (args, line)
    assert not any(tmp_path.iterdir())


@pytest.mark.processes
def test_without_onnx_the_safetensors_export_still_works(trained, exported, tmp_path):
    from safetensors.torch import load_file

    out, _ = exported
    proc = run(
        [PY, "-c", WITHOUT_ONNX, "resnet_dist.export", "--checkpoint", str(ckpt_of(trained))]
        + ["--out", str(tmp_path / "e")]
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("warning: no ONNX export: onnx, onnxscript, onnxruntime not installed")
    assert "pip install -e .[export]" in line
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["model.json", "model.safetensors"]
    mine, full = load_file(tmp_path / "e" / "model.safetensors"), load_file(out / "model.safetensors")
    assert mine.keys() == full.keys() and all(torch.equal(mine[k], full[k]) for k in full)
    assert json.loads((tmp_path / "e" / "model.json").read_text())["onnx"] is None

    # asked for by name it is an error; predict --onnx says the same
    proc = run([PY, "-c", WITHOUT_ONNX, "resnet_dist.predict", "--model", str(out), "--onnx", str(tmp_path)])
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == "error: --onnx needs onnxruntime: pip install -e .[export]"


@pytest.fixture(scope="module")
def pngs(data_root, tmp_path_factory):
    """30 real test images as 28x28 PNG files, plus a truncated PNG and a text file named .png."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("pngs")
    images = load_split(prepare(str(data_root)), "test", 30)[0]
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy()).save(folder / f"img{i:02d}.png")
    whole = (folder / "img00.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "text.png").write_text("not an image, whatever the name says\n")
    (folder / "notes.txt").write_text("not an image file name: a folder argument skips it\n")
    return folder, images


def check_predictions(stdout: str, stderr: str, folder, expected: torch.Tensor) -> list[dict]:
    lines = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [r["path"] for r in lines] == [str(folder / f"img{i:02d}.png") for i in range(30)]
    for r, want in zip(lines, expected.tolist()):
        assert len(r["top"]) == 3 and r["top"][0]["index"] == want, r
        assert all(t["class"] == CLASSES[t["index"]] for t in r["top"])
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    errors = stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("error: ") for e in errors), errors
    assert (
        "text.png: not a readable image" in errors[0] and "truncated.png: not a readable image" in errors[1]
    )
    return lines


def test_predict_matches_evaluate_with_torch_and_onnx(trained, exported, pngs, capsys):
    out, _ = exported
    folder, images = pngs
    _, model, evaluator = reference(trained)
    expected = evaluator.predict(model, images).argmax(1)  # what `evaluate` predicts for these images
    assert len(set(expected.tolist())) >= 3  # a model that says one class everywhere would prove little

    assert (
        predict.main(["--model", str(out), str(folder)]) == 1
    )  # two files failed, the others were predicted
    with_torch = check_predictions(*capsys.readouterr(), folder, expected)

    assert predict.main(["--model", str(out), "--onnx", str(folder)]) == 1
    with_onnx = check_predictions(*capsys.readouterr(), folder, expected)
    for a, b in zip(with_torch, with_onnx):
        assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) < 1e-4

    # a checkpoint works as the model too, and a file argument is taken whatever its name
    args = ["--model", str(ckpt_of(trained)), "--top", "1", *sorted(map(str, folder.glob("img*.png")))]
    assert predict.main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["top"][0]["index"] for r in lines] == expected.tolist() and all(
        len(r["top"]) == 1 for r in lines
    )


def test_image_conversion():
    """Any size and colour: grayscale, fitted into 28x28 keeping the aspect ratio on black; --invert for dark
    on light; a 28x28 grayscale image passes unchanged."""
    from PIL import Image

    gray = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    assert np.array_equal(predict.to_input(Image.fromarray(gray), invert=False), gray)
    assert np.array_equal(predict.to_input(Image.fromarray(gray), invert=True), 255 - gray)
    red = Image.new("RGB", (120, 60), (255, 0, 0))  # wide: 28x14 centred, black bands above and below
    x = predict.to_input(red, invert=False)
    assert x.shape == (28, 28) and x.dtype == np.uint8
    assert (x[:7] == 0).all() and (x[21:] == 0).all() and (x[7:21] == 76).all()  # red's luma: 0.299 * 255
    dark_on_white = Image.new("LA", (56, 56), (255, 0))  # transparent: the background, white before --invert
    dark_on_white.paste((0, 255), (14, 14, 42, 42))
    y = predict.to_input(dark_on_white, invert=True)
    assert y[14, 14] == 255 and y[0, 0] == 0 and y[27, 27] == 0


def test_predict_usage_errors_exit_2_with_one_line(trained, exported, pngs, tmp_path, capsys):
    out, _ = exported
    folder, _ = pngs
    onnx_only = tmp_path / "onnx_only"
    onnx_only.mkdir()
    shutil.copy(out / "model.json", onnx_only)
    card = json.loads((out / "model.json").read_text())
    edited = {  # model.json edited by hand, beside the real weights
        "short": {**card, "classes": card["classes"][:9]},
        "one": {**card, "classes": ["Sneaker"]},  # no --top: once "--top must be between 1 and 1"
    }
    for name, c in edited.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text(json.dumps(c))
        for f in ("model.onnx", "model.safetensors"):
            (tmp_path / name / f).symlink_to(out / f)
    short_json = tmp_path / "short" / "model.json"
    for args, words in [
        (
            ["--model", str(tmp_path / "short"), "--onnx", str(folder)],
            f"{short_json} is not a usable model card",
        ),
        (["--model", str(tmp_path / "short"), str(folder)], "it names 9 classes, its model has 10 outputs"),
        (["--model", str(tmp_path / "one"), str(folder)], "it names 1 classes, its model has 10 outputs"),
        (["--model", str(tmp_path / "none"), str(folder)], "no model at"),
        (["--model", str(folder), str(folder)], "has no model.json"),
        (["--model", str(onnx_only), str(folder)], "has no model.safetensors"),
        (["--model", str(tmp_path), "--onnx", str(folder)], "has no model.json"),
        (["--model", str(ckpt_of(trained)), "--onnx", str(folder)], "--onnx needs an export folder"),
        (["--model", str(out), "--top", "0", str(folder)], "--top must be between 1 and 10"),
    ]:
        code = exit_code(predict.main, args)
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert code == 2 and line.startswith("error: ") and words in line, (args, line)
        assert captured.out == ""


def test_log_model_config_key():
    assert config.Config().log.wandb.log_model is False
    assert config.load(None, ["log.wandb.log_model=true"], world_size=1).log.wandb.log_model is True
    with pytest.raises(config.ConfigError, match="log.wandb.log_model"):
        config.load(None, ["log.wandb.log_model=maybe"], world_size=1)


def md5_b64(path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_wandb_model_artifact_offline(data_root, tmp_path):
    """A finished offline run with log.wandb.log_model: <run dir>/export/ holds the weights and card, and the
    run's .wandb file logs them as a model artifact (its files staged for `wandb sync`)."""
    wandb_home = {
        k: str(tmp_path / k.lower()) for k in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")
    }
    overrides = small_run(data_root, tmp_path, "wbm", "train.epochs=1", "data.train_subset=128")
    from resnet_dist import train

    code, out, err = call(
        train.main, *overrides, "log.wandb.log_model=true", WANDB_MODE="offline", **wandb_home
    )
    assert code == 0, err
    run_dir = tmp_path / "wbm"
    exp = run_dir / "export"
    assert sorted(p.name for p in exp.iterdir()) == ["model.json", "model.safetensors"]
    card = json.loads((exp / "model.json").read_text())
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert card["checkpoint"]["global_step"] == state["progress"]["global_step"] == 2

    (wb_file,) = wandb_files(run_dir)
    wb = read_run(wb_file)
    assert {a["type"] for a in wb.artifacts} == {"model", "run_table"}  # the confusion charts log tables too
    (art,) = [a for a in wb.artifacts if a["type"] == "model"]
    assert (art["type"], art["name"]) == ("model", f"model-{wb.id}") and "step-2" in art["aliases"]
    assert art["metadata"]["checkpoint"]["global_step"] == 2 and art["metadata"]["classes"] == list(CLASSES)
    assert sorted(art["files"]) == ["model.json", "model.safetensors"]
    for name, entry in art["files"].items():
        assert entry["size"] == (exp / name).stat().st_size and entry["digest"] == md5_b64(exp / name)
        assert md5_b64(Path(entry["local_path"])) == entry["digest"]  # the staged copy `wandb sync` sends
    assert f"wandb: logged the model artifact model-{wb.id}" in out and wb.exit_code == 0


def test_out_that_is_a_file_exits_2_and_the_file_stays(trained, tmp_path, capsys):
    from resnet_dist import plots

    a_file = tmp_path / "model.txt"
    a_file.write_text("the user's notes\n")
    ckpt = str(ckpt_of(trained))
    for main, args in [
        (export.main, ["--checkpoint", ckpt, "--out", str(a_file)]),
        (export.main, ["--checkpoint", ckpt, "--out", str(a_file / "export"), "--format", "safetensors"]),
        (plots.main, ["--checkpoint", ckpt, "--out", str(a_file)]),
    ]:
        code = exit_code(main, args)
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert code == 2 and f"{a_file} is a file, not a folder" in line and not captured.out, line
    assert [p.name for p in tmp_path.iterdir()] == [
        "model.txt"
    ] and a_file.read_text() == "the user's notes\n"


def test_tilde_in_command_line_paths_is_the_home_folder(trained, data_root, tmp_path, monkeypatch, capsys):
    """`--out=~/x` and quoted paths reach the program with the `~` (no shell expands them): every path of the
    model tools expands it, and what they print is the absolute path."""
    from PIL import Image

    from resnet_dist import evaluate, plots

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / "ck.pt").symlink_to(ckpt_of(trained))
    image = load_split(prepare(str(data_root)), "test", 1)[0][0, 0].numpy()
    Image.fromarray(image).save(home / "img.png")

    assert export.main(["--checkpoint=~/ck.pt", "--out=~/exp", "--format", "safetensors"]) == 0
    assert f"wrote {home / 'exp' / 'model.safetensors'}" in capsys.readouterr().out
    assert predict.main(["--model=~/exp", "~/img.png"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(home / "img.png")
    assert plots.main(["--checkpoint=~/ck.pt", "--out=~/plots"]) == 0
    assert f"wrote {home / 'plots' / 'curves.png'}" in capsys.readouterr().out
    args = ["--checkpoint=~/ck.pt", "--out=~/ev", f"data.root={data_root}", "data.test_subset=20"]
    assert evaluate.main(args) == 0
    assert f"wrote {home / 'ev' / 'ck.eval.json'}" in capsys.readouterr().out
    assert not any(cwd.iterdir())  # no literal '~' folder


def png16(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (gray [H, W] or RGB [H, W, 3] uint16), written by hand: Pillow writes no 16-bit colour."""
    import struct
    import zlib

    h, w = pixels.shape[:2]
    kind = 0 if pixels.ndim == 2 else 2
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, kind, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_every_image_mode_predicts_as_its_8_bit_original(trained, data_root, tmp_path, capsys):
    """Real test images saved as 16-bit gray and RGB, 32-bit int and float, palette, gray + alpha, RGBA, CMYK
    and 1-bit files: each becomes the same model input as its 8-bit original (1-bit: as the thresholded
    original), so the same probabilities. A 16-bit picture is scaled by its depth, not clipped to white."""
    from PIL import Image

    images = load_split(prepare(str(data_root)), "test", 6)[0][:, 0].numpy()
    ramp = [v for i in range(256) for v in (i, i, i)]
    folders = {name: tmp_path / name for name in ("orig", "binary_orig", "modes", "binary")}
    for f in folders.values():
        f.mkdir()
    for i, g in enumerate(images):
        Image.fromarray(g).save(folders["orig"] / f"{i}.png")
        g16 = g.astype(np.uint16) * 257
        variants = {
            "gray16.png": Image.fromarray(g16),  # mode I;16
            "int32.tif": Image.fromarray(g16.astype(np.int32)),  # mode I
            "float.tif": Image.fromarray(g.astype(np.float32) / 255),  # mode F, 0..1
            "rgb.png": Image.fromarray(np.stack([g] * 3, -1)),
            "la.png": Image.fromarray(np.stack([g, np.full_like(g, 255)], -1), "LA"),
            "rgba.png": Image.fromarray(np.stack([g] * 3 + [np.full_like(g, 255)], -1)),
            "cmyk.tif": Image.fromarray(g).convert("CMYK"),
        }
        palette = Image.frombytes("P", g.shape[::-1], g.tobytes())
        palette.putpalette(ramp)
        variants["palette.png"] = palette
        for name, img in variants.items():
            img.save(folders["modes"] / f"{i}-{name}")
        png16(folders["modes"] / f"{i}-rgb16.png", np.stack([g16, g16, g16], -1))
        binary = np.where(g > 127, 255, 0).astype(np.uint8)
        Image.fromarray(binary).save(folders["binary_orig"] / f"{i}.png")
        Image.fromarray(binary).convert("1").save(folders["binary"] / f"{i}.png")
    for name, want in [("gray16.png", "I;16"), ("int32.tif", "I"), ("float.tif", "F"), ("palette.png", "P")]:
        with Image.open(folders["modes"] / f"0-{name}") as img:
            assert img.mode == want, (name, img.mode)

    def probs(folder) -> dict:
        files = sorted(map(str, folder.iterdir()))  # as files: a folder argument takes PNG and JPEG only
        assert predict.main(["--model", str(ckpt_of(trained)), "--top", "10", *files]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        return {Path(r["path"]).name: {t["index"]: t["prob"] for t in r["top"]} for r in lines}

    orig, modes = probs(folders["orig"]), probs(folders["modes"])
    assert len(modes) == 6 * 9
    for name, p in modes.items():
        want = orig[name.split("-")[0] + ".png"]
        assert max(abs(p[c] - want[c]) for c in want) < 1e-6, name
    binary_orig = probs(folders["binary_orig"])
    for name, p in probs(folders["binary"]).items():
        assert max(abs(p[c] - binary_orig[name][c]) for c in p) < 1e-6, name
    # the inputs themselves are equal, pixel for pixel
    for name in ("gray16.png", "rgb16.png", "int32.tif", "float.tif", "cmyk.tif", "palette.png"):
        a = predict.read_image(folders["modes"] / f"3-{name}", invert=False)
        assert torch.equal(a, torch.from_numpy(images[3]).unsqueeze(0)), name


def corrupt_exif() -> bytes:
    """An EXIF block whose directory claims 3 entries and holds 1: Pillow warns "Corrupt EXIF data"."""
    import struct

    entry = struct.pack(">HHI4s", 0x010E, 2, 2, b"A\x00\x00\x00")  # ImageDescription "A"
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">IH", 8, 3) + entry + struct.pack(">I", 0)


def test_pillow_warnings_are_one_line_per_image(trained, data_root, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 2000
    )  # a 50x50 image is then a possible decompression bomb

    g = load_split(prepare(str(data_root)), "test", 1)[0][0, 0].numpy()
    Image.fromarray(g).resize((50, 50)).save(tmp_path / "a_big.png")
    Image.fromarray(g).save(tmp_path / "b_exif.jpg", exif=corrupt_exif())
    Image.fromarray(g).save(tmp_path / "c_exif.png", exif=corrupt_exif())
    Image.fromarray(g).save(tmp_path / "d_plain.png")
    code, out, err = call(predict.main, "--model", str(ckpt_of(trained)), str(tmp_path))
    assert code == 0, err
    assert len(out.strip().splitlines()) == 4  # every image predicted
    assert err.strip().splitlines() == [
        f"warning: {tmp_path / 'a_big.png'}: Image size (2500 pixels) exceeds limit of 2000 pixels, could be "
        "decompression bomb DOS attack.",
        f"warning: {tmp_path / 'b_exif.jpg'}: Corrupt EXIF data. Expecting to read 12 bytes but only got 4.",
        f"warning: {tmp_path / 'c_exif.png'}: Corrupt EXIF data. Expecting to read 12 bytes but only got 4.",
    ]


def test_a_checkpoint_before_its_first_evaluation_has_no_last_test(trained):
    state = checkpoint.load(ckpt_of(trained))
    assert export.last_test(state)["samples"] == 999
    state.pop("history")  # optional in a checkpoint (checkpoint.OPTIONAL), empty before the first epoch ends
    assert export.last_test(state) is None and export.last_test({**state, "history": []}) is None


def listing(folder: Path) -> dict:
    """{name: bytes} of a folder's files."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_never_replaces_files_it_did_not_write(trained, tmp_path, capsys):
    """A folder holding the user's model.onnx and model.json, or an export of ours plus a file of the user's,
    is refused (exit 2, one line) and left byte for byte; an earlier export of ours alone is replaced whole."""
    ckpt = str(ckpt_of(trained))
    users = tmp_path / "users"
    users.mkdir()
    (users / "model.onnx").write_bytes(b"the user's own ONNX model")
    (users / "model.json").write_text('{"labels": ["cat", "dog"]}\n')
    ours = tmp_path / "ours"
    assert export.main(["--checkpoint", ckpt, "--out", str(ours), "--format", "safetensors"]) == 0
    card = json.loads((ours / "model.json").read_text())
    assert card["files"] == ["model.safetensors", "model.json"]
    with_notes = tmp_path / "with_notes"
    shutil.copytree(ours, with_notes)
    (with_notes / "notes.txt").write_text("mine\n")
    stray = tmp_path / "stray_onnx"  # an export without ONNX, and a model.onnx it did not write
    shutil.copytree(ours, stray)
    (stray / "model.onnx").write_bytes(b"not from this export")
    capsys.readouterr()
    for folder, names in [
        (users, "no model.json of an export (model.json, model.onnx)"),
        (with_notes, "files its export did not write (notes.txt)"),
        (stray, "files its export did not write (model.onnx)"),
    ]:
        before = listing(folder)
        for formats in ("safetensors", "safetensors,onnx"):
            code = exit_code(export.main, ["--checkpoint", ckpt, "--out", str(folder), "--format", formats])
            captured = capsys.readouterr()
            (line,) = captured.err.strip().splitlines()
            assert code == 2 and line == f"error: {folder} holds {names}: an export replaces its folder " + (
                "whole, so it writes only into a new or empty folder or over an earlier export; move those files "
                "or choose another --out"
            )
            assert listing(folder) == before and not captured.out

    # an export of ours alone: replaced whole, nothing left beside it
    (ours / "model.json").write_text(json.dumps({**card, "last_test": "edited"}))
    assert export.main(["--checkpoint", ckpt, "--out", str(ours), "--format", "safetensors"]) == 0
    assert json.loads((ours / "model.json").read_text()) == card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "stray_onnx", "users", "with_notes"]


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.json").write_text(json.dumps({"format": exportdir.FORMAT, "files": ["model.json"]}))
    before = listing(out)
    with pytest.raises(RuntimeError, match="verification failed"):
        with exportdir.replaced(out) as new:
            (new / "model.json").write_text("half an export")
            raise RuntimeError("verification failed")
    assert listing(out) == before and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_which_files_an_export_wrote_is_read_from_its_model_json(tmp_path):
    """An export of any version of the format is ours when its model.json lists its files; a model.json
    without that list, of another format, or not a JSON object at all is the user's: the folder is refused."""
    (tmp_path / "model.onnx").write_bytes(b"an export's model")
    ours = {"format": "resnet_dist export 1", "files": ["model.onnx", "model.json"]}
    (tmp_path / "model.json").write_text(json.dumps(ours))
    exportdir.check_replaceable(tmp_path)
    for card in [{**ours, "files": None}, {"format": "onnx"}, {**ours, "format": 1}, ["model.onnx"], "text"]:
        (tmp_path / "model.json").write_text(json.dumps(card))
        with pytest.raises(
            exportdir.ExportDirError, match=r"no model.json of an export \(model.json, model.onnx\)"
        ):
            exportdir.check_replaceable(tmp_path)


def dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_an_export_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    """A kill between the swap's two renames leaves the previous export aside and no folder in its place: the
    next export puts it back first (then replaces it, or leaves it there if it fails)."""
    import socket

    out = tmp_path / "export"
    aside = tmp_path / f".export.old-{socket.gethostname()}-{dead_pid()}"
    unfinished = tmp_path / f".export.export-{socket.gethostname()}-{dead_pid()}"
    aside.mkdir(), unfinished.mkdir()
    (aside / "model.json").write_text("the previous export")
    (unfinished / "model.safetensors").write_text("half of the new one")
    said = exportdir.clean_stale(out)
    assert len(said) == 2 and "put back the previous export" in said[0] and "unfinished" in said[1]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert (out / "model.json").read_text() == "the previous export"


# `python -m resnet_dist.export ARGS` held in the verification of its new model.onnx (written, not yet moved
# into place) until it is killed: the file argv[1] says it is there.
HELD_IN_VERIFICATION = """
import pathlib, sys, time
from resnet_dist import export
def held(*args, **kwargs):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(300)
export.verify = held
sys.exit(export.main(sys.argv[2:]))
"""


@pytest.mark.processes
def test_sigkill_during_the_onnx_verification_keeps_the_previous_export(
    trained, exported, tmp_path, tmp_path_factory, capsys
):
    """A real export killed (SIGKILL) while it verifies its new model.onnx: the previous export, model.onnx
    included, is untouched and loads; the next export removes the killed one's folder."""
    import signal

    import onnxruntime as ort

    from .helpers import launch, wait_for

    previous, _ = exported
    out = tmp_path / "export"
    shutil.copytree(previous, out)
    before = listing(out)
    args = ["--checkpoint", str(ckpt_of(trained)), "--out", str(out)]
    held = tmp_path_factory.mktemp("held") / "verifying"  # not beside the export: the test lists that folder
    proc = launch([PY, "-c", HELD_IN_VERIFICATION, str(held), *args])
    staging = tmp_path / f".export.export-{os.uname().nodename}-{proc.pid}"
    wait_for(held, proc)
    assert (staging / "model.onnx").stat().st_size > 40e6  # the new model.onnx, complete
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staging.is_dir()  # killed before the swap
    assert listing(out) == before
    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])  # loads

    assert export.main([*args, "--format", "safetensors"]) == 0
    said = capsys.readouterr().out
    assert f"note: removed {staging} (the unfinished folder of an export that was killed)" in said
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
