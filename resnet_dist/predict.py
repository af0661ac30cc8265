"""Predict the Fashion-MNIST class of image files: `python -m resnet_dist.predict --model DIR_OR_CHECKPOINT
IMAGE_OR_FOLDER... [--invert] [--onnx] [--top K]`.

--model is an export folder (model.json with model.safetensors, or with model.onnx for --onnx) or a .pt
checkpoint. A folder argument stands for its .png/.jpg/.jpeg files (not its subfolders), sorted by name.
Prints one JSON line per image on stdout: {"path": ..., "top": [{"class": ..., "index": ..., "prob": ...},
...]}, the K most probable classes (default 3). A file that cannot be read as an image gets one line on
stderr and the others are still predicted; the exit status is then 1.

Each picture becomes a Fashion-MNIST image (light garment on black, 28x28; --invert for dark on light), then
the model's input as in training. It runs on CPU in fp32: PyTorch as `evaluate` predicts (flip TTA included
when the run had it), or with --onnx the exported model.onnx under onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from . import cli
from .errors import UsageError, first_line
from .fashion_mnist import IMAGE_SIZE
from .runners import (
    INSTALL_HINT,
    ExportError,
    OnnxRunner,
    TorchRunner,
    inference_card,
    load_checkpoint,
    load_exported,
    read_card,
)

log = logging.getLogger("resnet_dist.predict")  # not __name__: run as __main__ by python -m

SUFFIXES = (".png", ".jpg", ".jpeg")
CHUNK = 256  # images read and predicted at a time: memory stays flat on any folder


# The pictures: any image file as a Fashion-MNIST image.


class ImageError(ValueError):
    """A file that cannot be read as an image."""


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # Pillow's gray modes of more than 8 bits


def to_8bit(img):
    """A gray image of more than 8 bits as 8-bit "L" (or "LA" with its transparency), scaled by its bit depth:
    Pillow's convert("L") clips at 255, so a 16-bit picture would come out nearly white. 16-bit ("I;16*",
    and "I", which is how Pillow opens 16-bit PNG and TIFF files): v / 257, rounded; floating point ("F"):
    0..1 when no value exceeds 1, else 0..255. 16-bit colour PNGs Pillow itself reads as 8-bit per channel."""
    from PIL import Image

    v = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if v.size and v.max() <= 1.0 else 1.0
    else:
        scale = 1 / 257
    gray = Image.fromarray(np.clip(np.rint(v * scale), 0, 255).astype(np.uint8), "L")
    key = img.info.get("transparency")  # a 16-bit gray PNG's transparent value (tRNS)
    if isinstance(key, int):
        alpha = Image.fromarray(np.where(v == key, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (gray, alpha))
    return gray


def to_input(img, invert: bool) -> np.ndarray:
    """A PIL image of any size and mode -> uint8 [28, 28], light on dark, as Fashion-MNIST made its images:
    1. EXIF orientation applied; transparency flattened onto the background (black, or white with --invert);
    2. grayscale ("L": 0.299 R + 0.587 G + 0.114 B); more than 8 bits per pixel: scaled by the depth (to_8bit);
    3. `invert` for dark-on-light pictures (a product photo on white): 255 - x;
    4. unless already 28x28: scaled to fit 28x28 keeping its aspect ratio (Lanczos, antialiased when
       shrinking), centred on black.
    The runners then normalize it as training does: x / 255, (x - mean) / std, bilinear resize to the model's
    input size when it trained on a larger one."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in WIDE_MODES:
        img = to_8bit(img)
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if invert else (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("L")
    if invert:
        img = ImageOps.invert(img)
    n = IMAGE_SIZE
    if img.size != (n, n):
        w, h = img.size
        scale = n / max(w, h)
        fitted = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        img = Image.new("L", (n, n), 0)
        img.paste(fitted, ((n - fitted.width) // 2, (n - fitted.height) // 2))
    return np.asarray(img, dtype=np.uint8)


def read_image(path: Path, invert: bool) -> torch.Tensor:
    """uint8 [1, 28, 28]; ImageError in one line for a file that is not a whole PNG/JPEG/... image. What
    Pillow warns about while reading it (a very large image, corrupt EXIF data) becomes one line on stderr,
    `warning: PATH: ...`, instead of Python's two-line warnings."""
    from PIL import Image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(path) as img:
                img.load()  # decode now: a truncated file fails here, not later
                x = torch.from_numpy(to_input(img, invert).copy()).unsqueeze(0)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise ImageError(f"{path}: not a readable image ({first_line(e)})") from None
    said = dict.fromkeys(" ".join(str(w.message).split())[:200] for w in caught)  # each once, in order
    if said:
        log.warning(f"{path}: {'; '.join(said)}")
    return x


def image_files(args: list[str]) -> tuple[list[Path], list[str]]:
    """The files to predict, in order (a folder: its image files, sorted), and one error per bad argument."""
    files, errors = [], []
    for a in args:
        p = cli.expand_path(a)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES and f.is_file())
            if not found:
                errors.append(f"{p}: no {'/'.join(SUFFIXES)} files in this folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors


def load_runner(model: Path, use_onnx: bool):
    """(card, runner) for --model: an export folder (safetensors or, with --onnx, model.onnx) or a checkpoint;
    ExportError (or CheckpointError, ConfigError) in one line when it cannot be used."""
    if model.is_dir():
        if not use_onnx:
            card, net = load_exported(model)
            return card, TorchRunner(net, card)
        card = read_card(model)
        if not (model / "model.onnx").is_file():
            raise ExportError(f"{model} has no model.onnx (python -m resnet_dist.export --format onnx)")
        try:
            return card, OnnxRunner(model / "model.onnx", card)
        except ImportError:
            raise ExportError(f"--onnx needs onnxruntime: {INSTALL_HINT}") from None
    if not model.is_file():
        raise ExportError(f"no model at {model} (an export folder or a .pt checkpoint)")
    if use_onnx:
        raise ExportError(f"--onnx needs an export folder with model.onnx, not the checkpoint {model}")
    _, cfg, net = load_checkpoint(model)
    card = inference_card(cfg)
    return card, TorchRunner(net, card)


def top_k(logits: torch.Tensor, classes: list[str], k: int) -> list[list[dict]]:
    probs = logits.float().softmax(1)
    p, i = probs.topk(k, dim=1)
    return [
        [{"class": classes[c], "index": c, "prob": round(v, 6)} for v, c in zip(row_p, row_i)]
        for row_p, row_i in zip(p.tolist(), i.tolist())
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m resnet_dist.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="an export folder or a .pt checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="PNG/JPEG files or folders of them")
    p.add_argument("--invert", action="store_true", help="dark garment on a light background: invert first")
    p.add_argument("--onnx", action="store_true", help="run the export folder's model.onnx with onnxruntime")
    p.add_argument("--top", type=int, metavar="K", help="how many classes per image (default 3)")
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        card, runner = load_runner(cli.expand_path(args.model), args.onnx)
        classes = card["classes"]
        top = min(3, len(classes)) if args.top is None else args.top
        if not 1 <= top <= len(classes):
            raise UsageError(f"--top must be between 1 and {len(classes)} (the model's classes), got {top}")
    except UsageError as e:
        return cli.report(e)
    files, errors = image_files(args.images)
    for e in errors:
        log.error(e)
    failed = len(errors)
    for start in range(0, len(files), CHUNK):
        read, images = [], []
        for path in files[start : start + CHUNK]:
            try:
                images.append(read_image(path, args.invert))
                read.append(path)
            except ImageError as e:
                log.error(e)
                failed += 1
        if not images:
            continue
        for path, best in zip(read, top_k(runner.logits(torch.stack(images)), classes, top)):
            print(json.dumps({"path": str(path), "top": best}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
