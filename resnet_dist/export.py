"""Export a checkpoint for use without this package, and prove the export computes what the checkpoint does:
`python -m resnet_dist.export --checkpoint PATH [--out DIR] [--format safetensors,onnx] [--verify-only]
[KEY=VALUE ...]`.

Writes model.safetensors (the weights the checkpoint evaluates), model.json (what using them takes) and
model.onnx (verified with onnxruntime against the PyTorch model on the real test set) into DIR, by default
<run dir>/export; the new export replaces DIR whole (exportdir.py). `--verify-only` checks DIR/model.onnx
and writes nothing. KEY=VALUE chooses the verification data only (evaluate.OVERRIDABLE). The README's "Use
the model" says what each file holds.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, cli, config, exportdir, files
from .errors import RunError, UsageError
from .evaluate import check_overrides
from .fashion_mnist import check_root, load_split, prepare
from .runners import INSTALL_HINT, OnnxRunner, TorchRunner, inference_card, load_checkpoint

log = logging.getLogger("resnet_dist.export")  # not __name__: run as __main__ by python -m

FORMATS = ("safetensors", "onnx")
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # onnxscript: the dynamo exporter writes through it
MAX_DIFF, MIN_AGREEMENT = 1e-3, 0.999


def default_out(ckpt: Path) -> Path:
    """<run dir>/export for a run's checkpoint (where training puts its export too), else a sibling folder."""
    return ckpt.parent.parent / "export" if ckpt.parent.name == "checkpoints" else ckpt.parent / "export"


def last_test(state: dict) -> dict | None:
    """The checkpoint's last test accuracy, from its own history (the last evaluation's confusion matrix);
    None before the first. `epoch` counts the epochs done at that evaluation, as the checkpoint's epoch does:
    equal, with step_in_epoch 0, means these very weights were evaluated."""
    if not state.get("history"):
        return None
    last = state["history"][-1]
    conf = torch.tensor(last["confusion"])
    count = int(conf.sum())
    acc = float(conf.diag().sum()) / count  # as Evaluator.evaluate computes test/acc
    return {"acc": acc, "samples": count, "epoch": last["epoch"] + 1}


def checkpoint_card(state: dict, cfg: config.Config, ckpt: Path) -> dict:
    """model.json of a checkpoint's export: what running the model takes, and where it came from."""
    progress = state["progress"]
    return {
        "format": exportdir.FORMAT,
        **inference_card(cfg),
        "weights": "ema" if state.get("ema") else "model",
        "checkpoint": {
            "path": str(ckpt),
            "global_step": progress["global_step"],
            "epoch": progress["epoch"],
            "step_in_epoch": progress["step_in_epoch"],
        },
        "last_test": last_test(state),
        "torch_version": torch.__version__,
        "onnx": None,
    }


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
    """model.onnx at `path`, not verified yet; the card's "onnx" entry (verification: None)."""
    import onnx

    size, classes = card["input"]["size"], len(card["classes"])

    def write(tmp: Path) -> None:
        torch.onnx.export(
            Logits(model, card["tta_flip"]).eval(),
            (torch.zeros(2, 1, size, size),),
            str(tmp),
            dynamo=True,  # torch's recommended exporter, at its default opset
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,  # one self-contained file (the weights are ~45 MB)
            verbose=False,
        )

    files.atomic_write(path, write)
    opsets = onnx.load(str(path), load_external_data=False).opset_import
    return {
        "file": path.name,
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": next(o.version for o in opsets if o.domain in ("", "ai.onnx")),
        "input": {"name": "image", "dtype": "float32", "shape": ["batch", 1, size, size]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", classes]},
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


def write_export(state: dict, card: dict, out: Path, formats, model=None, images=None) -> list[Path]:
    """The export of `formats` into `out`, built beside it and swapped in whole (exportdir.replaced):
    model.safetensors, model.onnx verified on `images` (VerificationFailed when it fails), then model.json, which
    lists them. A failure leaves an earlier export in `out` as it was. Returns the files, as they are in `out`."""
    from safetensors.torch import save_file

    with exportdir.replaced(out) as new:
        written = []
        if "safetensors" in formats:
            weights = {k: v.contiguous() for k, v in checkpoint.evaluated_weights(state).items()}
            meta = {"format": "pt", "producer": "resnet_dist"}
            files.atomic_write(new / "model.safetensors", lambda p: save_file(weights, p, metadata=meta))
            written.append("model.safetensors")
        if "onnx" in formats:
            card["onnx"] = write_onnx(model, card, new / "model.onnx")
            card["onnx"]["verification"] = v = verify(
                TorchRunner(model, card), OnnxRunner(new / "model.onnx", card), images
            )
            if not v["passed"]:
                raise VerificationFailed(
                    f"the ONNX export does not compute what the checkpoint does {describe(v)}"
                )
            written.append("model.onnx")
        card["files"] = [*written, "model.json"]
        text = json.dumps(card, indent=1) + "\n"
        files.atomic_write(new / "model.json", lambda p: p.write_text(text))
    return [out / name for name in card["files"]]


def export_weights(ckpt: Path, out: Path) -> dict:
    """model.safetensors and model.json of a checkpoint (what training's W&B artifact holds); the card."""
    state, cfg, _ = load_checkpoint(ckpt)
    card = checkpoint_card(state, cfg, ckpt)
    write_export(state, card, out, ("safetensors",))
    return card


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"--format takes {' and/or '.join(FORMATS)} (comma-separated), got {text!r}")
    return formats


class VerificationFailed(RunError):
    """model.onnx does not compute what the checkpoint does: exit 1, and no model.onnx is left in place."""


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
    try:
        return export(args)
    except (UsageError, RunError) as e:
        return cli.report(e)


def export(args) -> int:
    path = cli.checkpoint_file(args.checkpoint)
    formats = parse_formats(args.format) if args.format else FORMATS
    out = (cli.expand_path(args.out) if args.out else default_out(path)).absolute()
    what = "--out" if args.out else "the export folder"
    if args.verify_only and not (out / "model.onnx").is_file():
        raise UsageError(f"--verify-only: no model.onnx in {out}")
    if not args.verify_only:  # written into, and built beside it: both must take files
        out = cli.out_folder(str(out), what)
        cli.out_folder(str(out.parent), f"{what} {out}: its parent folder")
    wants_onnx = "onnx" in formats or args.verify_only
    missing = onnx_missing() if wants_onnx else []
    if missing:
        msg = f"no ONNX export: {', '.join(missing)} not installed here ({INSTALL_HINT} installs them)"
        if args.format or args.verify_only:  # asked for by name: a failure, before anything is written
            raise RunError(msg)
        log.warning(msg)  # by default: a warning, and no model.onnx
        formats, wants_onnx = ("safetensors",), False
    check_overrides(args.overrides, "export")  # before the checkpoint: cheaper
    if not args.verify_only:
        exportdir.check_replaceable(Path(os.path.realpath(out)))
    state, cfg, model = load_checkpoint(path, args.overrides)
    card = checkpoint_card(state, cfg, path)
    if wants_onnx:  # the verification reads the test set
        check_root(cfg.data.root)
    images = verification_images(cfg) if wants_onnx else None
    if args.verify_only:
        v = verify(TorchRunner(model, card), OnnxRunner(out / "model.onnx", card), images)
        if not v["passed"]:
            raise VerificationFailed(
                f"{out / 'model.onnx'} does not compute what the checkpoint does {describe(v)}"
            )
        print(f"verified {out / 'model.onnx'} {describe(v)}", flush=True)
        return 0
    try:
        written = write_export(state, card, out, formats, model, images)
    except OSError as e:  # the folders themselves: a full disk, a mount point, ...
        raise RunError(
            f"could not write the export into {out}: {e.strerror or e}; an earlier export there is kept"
        ) from None
    if card["onnx"]:
        o = card["onnx"]
        print(f"verified {out / 'model.onnx'} {describe(o['verification'])} (opset {o['opset']})", flush=True)
    print("wrote " + ", ".join(map(str, written)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
