"""Export a checkpoint for use without this package, and prove the export computes what the checkpoint does:
`python -m resnet_dist.export --checkpoint PATH [--out DIR] [--format safetensors,onnx] [--verify-only]
[KEY=VALUE ...]`.

Writes into DIR (default: <run dir>/export for runs/NAME/checkpoints/X.pt, else <checkpoint folder>/export):

- model.safetensors: the weights the checkpoint evaluates (its EMA when the run had one), no pickle; the
  keys are the state_dict keys of `resnet_dist.model.build_model`.
- model.json: what anyone needs to use them (architecture and stem, input size and how an image becomes the
  input, mean/std, class names in order, the checkpoint's step, epoch and last test accuracy, the torch
  version, the ONNX input and output and the verification figures). Always written.
- model.onnx (needs `pip install -e .[export]`): torch's recommended exporter (`torch.onnx.export(...,
  dynamo=True)`, its default opset), a dynamic batch dimension; the input is the normalized float image
  [N, 1, H, W], the output the logits [N, classes] (with the run's flip TTA inside when it had one). The file
  is checked with onnxruntime on CPU against the PyTorch model on the real test set, as much of it as the run
  evaluated (its data.test_subset; data.test_subset=null for all 10,000 images: ~1 min on 2 CPU cores with
  the 7x7 stem at 28x28, several with the cifar stem or a larger data.resize): the largest absolute logit
  difference and the share of equal top-1 predictions are printed and stored in model.json; under 99.9%
  agreement or over 1e-3 difference the export fails (exit 1, one line) and DIR stays as it was.

`--verify-only` checks an existing DIR/model.onnx against the checkpoint the same way and writes nothing.
Overrides choose the verification data only: the keys evaluate takes (evaluate.OVERRIDABLE), nothing else.
The export is built in a fresh folder beside DIR, verified there and swapped in whole (exportdir.py): a failed
or killed export leaves an earlier one in DIR as it was, and DIR is refused (exit 2, nothing written) when it
holds files an export did not write.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint, cli, config, exportdir, files
from .data import CLASSES, MEAN, STD, DataError, load_split, normalize, prepare
from .data import check_root as check_data_root
from .evaluate import Evaluator, check_overrides, checkpoint_config, load_model
from .model import build_model

FORMATS = ("safetensors", "onnx")
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # onnxscript: the dynamo exporter writes through it
INSTALL_HINT = "pip install -e .[export]"
MAX_DIFF, MIN_AGREEMENT = 1e-3, 0.999
SOURCE_SIZE = 28  # Fashion-MNIST's images; a larger data.resize is bilinear up-sampling of these
CPU = torch.device("cpu")


class ExportError(RuntimeError):
    """An export folder or file that cannot be used (exit 2), or an ONNX file that fails its check (exit 1)."""


def atomic_write(path: Path, write) -> Path:
    """checkpoint.atomic_write, with the temporary named `.tmp-<pid>-<name>`: it keeps the file's suffix
    (some writers look at it)."""
    return files.atomic_write(path, write, tmp=path.with_name(f".tmp-{os.getpid()}-{path.name}"))


def default_out(ckpt: Path) -> Path:
    """<run dir>/export for a run's checkpoint (where training puts its export too), else a sibling folder."""
    return ckpt.parent.parent / "export" if ckpt.parent.name == "checkpoints" else ckpt.parent / "export"


def last_test(state: dict, ckpt: Path) -> dict | None:
    """The checkpoint's last test accuracy: from its own history (the last epoch's confusion matrix, which
    travels with the checkpoint and cannot belong to another run), else from the epoch records of the run's
    metrics.jsonl at or before its step, else None. `epoch` counts the epochs done at that evaluation, as
    the checkpoint's epoch does: equal, with step_in_epoch 0, means these very weights were evaluated."""
    history = state.get("history") or []
    if history:
        conf = torch.tensor(history[-1]["confusion"])
        count = int(conf.sum())
        acc = float(conf.diag().sum()) / count  # as Evaluator.evaluate computes test/acc
        return {"acc": acc, "samples": count, "epoch": history[-1]["epoch"] + 1, "source": "checkpoint"}
    metrics = ckpt.parent.parent / "metrics.jsonl"
    step = state["progress"]["global_step"]
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    done = [r for r in records if r.get("kind") == "epoch" and r["step"] <= step]
    if not done:
        return None
    r = done[-1]
    return {
        "acc": r["test/acc"],
        "samples": r["test/samples"],
        "epoch": r["epoch"] + 1,
        "source": str(metrics),
    }


def class_names(n: int) -> list[str]:
    """One name per output: Fashion-MNIST's, then "class 10", ... for a model with more outputs."""
    return list(CLASSES[:n]) + [f"class {i}" for i in range(len(CLASSES), n)]


def model_card(state: dict, cfg: config.Config, ckpt: Path) -> dict:
    """model.json: everything a user of the weights needs, without this package."""
    size = cfg.data.resize or SOURCE_SIZE
    progress = state["progress"]
    return {
        "format": exportdir.FORMAT,
        "architecture": "ResNet-18 for 1-channel images (resnet_dist.model.build_model); the safetensors "
        "keys are its state_dict keys",
        "model": cfg.to_dict()["model"],
        "weights": "ema" if state.get("ema") else "model",
        "tta_flip": cfg.train.tta_flip,
        "classes": class_names(cfg.model.num_classes),
        "input": {
            "channels": 1,
            "size": size,
            "mean": MEAN,
            "std": STD,
            "light_on_dark": True,
            "preprocess": f"a {SOURCE_SIZE}x{SOURCE_SIZE} uint8 grayscale image (Fashion-MNIST: light garment "
            "on black), x / 255, then (x - mean) / std"
            + (
                f", then bilinear resize to {size}x{size} (torch interpolate, align_corners=False, no antialias)"
                if size != SOURCE_SIZE
                else ""
            ),
        },
        "checkpoint": {
            "path": str(ckpt),
            "global_step": progress["global_step"],
            "epoch": progress["epoch"],
            "step_in_epoch": progress["step_in_epoch"],
        },
        "last_test": last_test(state, ckpt),
        "torch_version": torch.__version__,
        "onnx": None,
    }


def read_card(folder: Path) -> dict:
    """model.json of an export folder, checked for what the runners read: a model this package can build, an
    input size, and one class name per output of that model."""
    path = folder / "model.json"
    try:
        card = json.loads(path.read_text())
        outputs = config.from_dict(
            {"model": card["model"]}
        ).model.num_classes  # a model this package can build
        _ = int(card["input"]["size"]), bool(card["tta_flip"])
        classes = card["classes"]
    except FileNotFoundError:
        raise ExportError(
            f"{folder} has no model.json: not an export folder (python -m resnet_dist.export)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, config.ConfigError) as e:
        raise ExportError(f"{path} is not a usable model card ({type(e).__name__}: {e})") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ExportError(f"{path} is not a usable model card: 'classes' is not a list of names")
    if len(classes) != outputs:
        raise ExportError(
            f"{path} is not a usable model card: it names {len(classes)} classes, its model has {outputs} "
            "outputs (model.num_classes)"
        )
    return card


def card_model(card: dict, weights: dict) -> nn.Module:
    """The PyTorch model a card describes, with `weights` (a state_dict), in eval mode on CPU."""
    model = build_model(config.from_dict({"model": card["model"]}).model)
    model.load_state_dict(weights)
    return model.eval()


def load_exported(folder: Path) -> tuple[dict, nn.Module]:
    """(card, model) of an export folder: model.json and model.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card = read_card(folder)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise ExportError(
            f"{folder} has no model.safetensors (exported with --format onnx only?): use --onnx"
        )
    try:
        return card, card_model(card, load_file(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"{path}: cannot load these weights ({first})") from None


def load_checkpoint(path: Path, overrides=()) -> tuple[dict, config.Config, dict, nn.Module]:
    """(state, config, card, model in eval mode on CPU) of a checkpoint; CheckpointError or ConfigError."""
    state = checkpoint.load(path)  # weights_only: a crafted file cannot run code
    cfg = checkpoint_config(state, overrides, "export")
    return state, cfg, model_card(state, cfg, path), load_model(state, cfg, CPU).eval()


class TorchRunner:
    """Logits of uint8 images [N, 1, 28, 28] from the PyTorch model on CPU, exactly as `evaluate` computes
    them (Evaluator.predict: normalize, resize, flip TTA), in fp32 whatever precision the run trained in."""

    def __init__(self, model: nn.Module, card: dict, batch_size: int = 256):
        size = card["input"]["size"]
        self.model, self.batch_size = model.eval(), batch_size
        self.evaluator = Evaluator(
            size, batch_size, card["tta_flip"], "fp32", CPU, torch.contiguous_format, len(card["classes"])
        )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        b = self.batch_size
        return torch.cat(
            [self.evaluator.predict(self.model, images[i : i + b]) for i in range(0, len(images), b)]
        )


class OnnxRunner:
    """The same from model.onnx with onnxruntime on CPU: the same normalize(), then the ONNX graph."""

    def __init__(self, path: Path, card: dict, batch_size: int = 256):
        import onnxruntime as ort

        self.size, self.batch_size = card["input"]["size"], batch_size
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types: truncated, not ONNX, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ExportError(f"{path}: onnxruntime cannot load it ({first})") from None
        self.runtime = f"onnxruntime {ort.__version__} CPUExecutionProvider"
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        n, size = len(card["classes"]), card["input"]["size"]
        if isinstance(out.shape[-1], int) and out.shape[-1] != n:
            raise ExportError(f"{path} has {out.shape[-1]} outputs, its model.json names {n} classes")
        if isinstance(inp.shape[-1], int) and inp.shape[-1] != size:
            raise ExportError(
                f"{path} takes {inp.shape[-1]}x{inp.shape[-1]} images, its model.json says {size}"
            )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x, b = normalize(images, self.size).numpy(), self.batch_size
        out = [self.session.run(["logits"], {"image": x[i : i + b]})[0] for i in range(0, len(x), b)]
        return torch.from_numpy(np.concatenate(out))


class Logits(nn.Module):
    """What model.onnx computes from a normalized batch: the logits, averaged with the mirror's when the run
    evaluated with flip TTA (as Evaluator.predict does), so the file alone predicts what `evaluate` does."""

    def __init__(self, model: nn.Module, tta_flip: bool):
        super().__init__()
        self.model, self.tta_flip = model, tta_flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return (out + self.model(x.flip(-1))) / 2 if self.tta_flip else out


def onnx_missing() -> list[str]:
    """The ONNX modules that cannot be imported here."""
    missing = []
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def write_onnx(model: nn.Module, card: dict, path: Path) -> dict:
    """Export to `path` (not verified yet); returns the card's "onnx" entry."""
    import onnx

    size = card["input"]["size"]
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        Logits(model, card["tta_flip"]).eval(),
        (torch.zeros(2, 1, size, size),),
        str(path),
        dynamo=True,  # torch's recommended exporter, at its default opset
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        external_data=False,  # one self-contained file (the weights are ~45 MB)
        verbose=False,
    )
    opset = next(
        o.version
        for o in onnx.load(str(path), load_external_data=False).opset_import
        if o.domain in ("", "ai.onnx")
    )
    return {
        "file": "model.onnx",
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "opset": opset,
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": ["batch", 1, size, size],
            "meaning": "the normalized image: see input.preprocess",
        },
        "output": {
            "name": "logits",
            "dtype": "float32",
            "shape": ["batch", len(card["classes"])],
            "meaning": "class logits in the order of classes"
            + (", flip TTA included" if card["tta_flip"] else ""),
        },
        "verification": None,
    }


def verify(torch_runner: TorchRunner, onnx_runner: OnnxRunner, images: torch.Tensor) -> dict:
    """Compare the ONNX file's logits with PyTorch's on `images`; "passed" applies the thresholds (a NaN
    difference fails)."""
    a, b = torch_runner.logits(images), onnx_runner.logits(images)
    diff = float((a - b).abs().max())
    agreement = float((a.argmax(1) == b.argmax(1)).double().mean())
    return {
        "runtime": onnx_runner.runtime,
        "images": len(images),
        "max_abs_logit_diff": diff,
        "top1_agreement": agreement,
        "thresholds": {"max_abs_logit_diff": MAX_DIFF, "top1_agreement": MIN_AGREEMENT},
        "passed": diff <= MAX_DIFF and agreement >= MIN_AGREEMENT,
    }


def describe(v: dict) -> str:
    return (
        f"on {v['images']} test images: max |logit difference| {v['max_abs_logit_diff']:.3g} (limit {MAX_DIFF:g}), "
        f"top-1 agreement {v['top1_agreement']:.4%} (limit {MIN_AGREEMENT:.1%})"
    )


def verification_images(cfg: config.Config) -> torch.Tensor:
    """The real test split (the first data.test_subset images of it), uint8 [N, 1, 28, 28]."""
    raw = prepare(cfg.data.root, cfg.data.mirror)
    return load_split(raw, "test", cfg.data.test_subset)[0]


def write_json(card: dict, out: Path) -> Path:
    return atomic_write(out / "model.json", lambda p: p.write_text(json.dumps(card, indent=1) + "\n"))


def write_safetensors(state: dict, out: Path) -> Path:
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in checkpoint.evaluated_weights(state).items()}
    meta = {"format": "pt", "producer": "resnet_dist"}
    return atomic_write(out / "model.safetensors", lambda p: save_file(weights, str(p), metadata=meta))


def write_export(state: dict, card: dict, out: Path, formats, model=None, images=None) -> list[Path]:
    """The export of `formats` into `out`, built beside it and swapped in whole (exportdir.replaced): its
    files, model.onnx verified on `images` (ExportError when it fails), then model.json, which lists them.
    A failure leaves an earlier export in `out` as it was. Returns the files, as they are in `out`."""
    with exportdir.replaced(out) as new:
        written = []
        if "safetensors" in formats:
            written.append(write_safetensors(state, new).name)
        if "onnx" in formats:
            card["onnx"] = export_onnx(model, card, new, images)
            written.append("model.onnx")
        card["files"] = [*written, "model.json"]
        write_json(card, new)
    return [out / name for name in card["files"]]


def export_weights(ckpt: Path, out: Path) -> dict:
    """model.safetensors and model.json of a checkpoint (what training's W&B artifact holds); the card."""
    state = checkpoint.load(ckpt)
    card = model_card(state, checkpoint_config(state, ()), ckpt)
    write_export(state, card, out, ("safetensors",))
    return card


def export_onnx(model: nn.Module, card: dict, out: Path, images: torch.Tensor) -> dict:
    """model.onnx, renamed into place only once verified; the card's "onnx" entry (verification included).
    Raises ExportError (one line) when the verification fails."""
    entry = {}

    def write_and_verify(tmp: Path) -> None:
        entry.update(write_onnx(model, card, tmp))
        entry["verification"] = v = verify(TorchRunner(model, card), OnnxRunner(tmp, card), images)
        if not v["passed"]:
            raise ExportError(f"the ONNX export does not compute what the checkpoint does {describe(v)}")

    atomic_write(out / "model.onnx", write_and_verify)
    return entry


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        cli.usage_error(f"--format takes {' and/or '.join(FORMATS)} (comma-separated), got {text!r}")
    return formats


def main(argv=None) -> int:
    p = cli.checkpoint_parser(
        "export",
        __doc__,
        "a checkpoint file (e.g. runs/NAME/checkpoints/last.pt)",
        "the export folder (default: <run dir>/export)",
    )
    p.add_argument("--format", help="safetensors, onnx or both (default: safetensors,onnx)")
    p.add_argument(
        "--verify-only",
        action="store_true",
        help="check DIR/model.onnx against the checkpoint; write nothing",
    )
    args = cli.parse(p, sys.argv[1:] if argv is None else argv)
    path = cli.expand_path(args.checkpoint)
    formats = parse_formats(args.format) if args.format else FORMATS
    if not path.is_file():
        cli.usage_error(f"no checkpoint file at {path}")
    out = (cli.expand_path(args.out) if args.out else default_out(path)).absolute()
    what = "--out" if args.out else "the export folder"
    if args.verify_only and not (out / "model.onnx").is_file():
        cli.usage_error(f"--verify-only: no model.onnx in {out}")
    if not args.verify_only:  # written into, and built beside it: both must take files
        out = cli.out_folder(str(out), what)
        cli.out_folder(str(out.parent), f"{what} {out}: its parent folder")
    wants_onnx = "onnx" in formats or args.verify_only
    missing = onnx_missing() if wants_onnx else []
    if missing:
        msg = f"no ONNX export: {', '.join(missing)} not installed here ({INSTALL_HINT} installs them)"
        if args.format or args.verify_only:  # asked for by name: a failure, before anything is written
            cli.fail(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)  # by default: a warning, and no model.onnx
        formats, wants_onnx = ("safetensors",), False
    try:
        check_overrides(args.overrides, "export")  # before the checkpoint: cheaper
        if not args.verify_only:
            exportdir.check_replaceable(Path(os.path.realpath(out)))
        state, cfg, card, model = load_checkpoint(path, args.overrides)
        if wants_onnx:  # the verification reads the test set
            check_data_root(cfg.data.root)
    except (checkpoint.CheckpointError, config.ConfigError, exportdir.ExportDirError) as e:
        cli.usage_error(str(e))

    try:
        images = verification_images(cfg) if wants_onnx else None
        if args.verify_only:
            v = verify(TorchRunner(model, card), OnnxRunner(out / "model.onnx", card), images)
            if not v["passed"]:
                cli.fail(f"{out / 'model.onnx'} does not compute what the checkpoint does {describe(v)}")
            print(f"verified {out / 'model.onnx'} {describe(v)}", flush=True)
            return 0
        written = write_export(state, card, out, formats, model, images)
    except (DataError, ExportError, exportdir.ExportDirError) as e:
        cli.fail(str(e))
    except OSError as e:  # the folders themselves: a full disk, a mount point, ...
        cli.fail(f"could not write the export into {out}: {e.strerror or e}; an earlier export there is kept")
    if card["onnx"]:
        print(
            f"verified {out / 'model.onnx'} {describe(card['onnx']['verification'])} (opset {card['onnx']['opset']})",
            flush=True,
        )
    print("wrote " + ", ".join(map(str, written)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
