"""A model card (model.json) and the runners that compute logits from it, with PyTorch or onnxruntime, on CPU in
fp32, exactly as `evaluate` predicts: what `predict` runs and `export` verifies its ONNX file with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint, config
from .data import normalize
from .errors import UsageError, first_line
from .evaluate import Evaluator, checkpoint_config, load_model
from .fashion_mnist import CLASSES, IMAGE_SIZE, MEAN, STD
from .model import build_model

INSTALL_HINT = "pip install -e .[export]"


CPU = torch.device("cpu")


class ExportError(UsageError):
    """An export folder, model card or model file that cannot be used: exit 2."""


def inference_card(cfg: config.Config) -> dict:
    """What running the model takes, as model.json holds it (export adds where it came from): the model
    config, the input (how an image becomes it: the README's "Use the model"), the classes, flip TTA."""
    return {
        "model": cfg.to_dict()["model"],
        "tta_flip": cfg.train.tta_flip,
        "classes": list(CLASSES),
        "input": {
            "channels": 1,
            "size": cfg.data.resize or IMAGE_SIZE,
            "mean": MEAN,
            "std": STD,
            "light_on_dark": True,
        },
    }


def read_card(folder: Path) -> dict:
    """model.json of an export folder, checked for what the runners read: a model this package can build, an
    input size, and one class name per output of that model."""
    path = folder / "model.json"
    try:
        card = json.loads(path.read_text())
        config.from_dict(
            {"model": card["model"]}
        )  # a model this package can build: it has len(CLASSES) outputs
        _ = int(card["input"]["size"]), bool(card["tta_flip"])
        classes = card["classes"]
    except FileNotFoundError:
        raise ExportError(
            f"{folder} has no model.json: not an export folder (python -m resnet_dist.export)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, config.ConfigError) as e:
        raise ExportError(
            f"{path} is not a usable model card ({type(e).__name__}: {first_line(e)})"
        ) from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ExportError(f"{path} is not a usable model card: 'classes' is not a list of names")
    if len(classes) != len(CLASSES):
        raise ExportError(
            f"{path} is not a usable model card: it names {len(classes)} classes, its model has {len(CLASSES)} "
            "outputs"
        )
    return card


def model_from_card(card: dict, weights: dict) -> nn.Module:
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
        return card, model_from_card(card, load_file(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ExportError(f"{path}: cannot load these weights ({first_line(e)})") from None


def load_checkpoint(path: Path, overrides=()) -> tuple[dict, config.Config, nn.Module]:
    """(state, config, model in eval mode on CPU) of a checkpoint; CheckpointError or ConfigError. Overrides:
    export's verification data (evaluate.OVERRIDABLE, which export checks first to name itself)."""
    state = checkpoint.load(path)  # weights_only: a crafted file cannot run code
    cfg = checkpoint_config(state, overrides)
    return state, cfg, load_model(state, cfg, CPU).eval()


class TorchRunner:
    """Logits of uint8 images [N, 1, 28, 28] from the PyTorch model on CPU, exactly as `evaluate` computes
    them (Evaluator.predict: normalize, resize, flip TTA), in fp32 whatever precision the run trained in."""

    def __init__(self, model: nn.Module, card: dict, batch_size: int = 256):
        self.model, self.batch_size = model.eval(), batch_size
        size, tta, n = card["input"]["size"], card["tta_flip"], len(card["classes"])
        self.evaluator = Evaluator(size, batch_size, tta, "fp32", CPU, torch.contiguous_format, n)

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
            raise ExportError(f"{path}: onnxruntime cannot load it ({first_line(e)})") from None
        self.runtime = f"onnxruntime {ort.__version__} CPUExecutionProvider"
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        n = len(card["classes"])
        if isinstance(out.shape[-1], int) and out.shape[-1] != n:
            raise ExportError(f"{path} has {out.shape[-1]} outputs, its model.json names {n} classes")
        if isinstance(inp.shape[-1], int) and inp.shape[-1] != self.size:
            raise ExportError(
                f"{path} takes {inp.shape[-1]}x{inp.shape[-1]} images, its model.json says {self.size}"
            )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x, b = normalize(images, self.size).numpy(), self.batch_size
        out = [self.session.run(["logits"], {"image": x[i : i + b]})[0] for i in range(0, len(x), b)]
        return torch.from_numpy(np.concatenate(out))
