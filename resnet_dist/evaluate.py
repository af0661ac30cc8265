"""Exact evaluation: `Evaluator` (predict, the sharded test metrics, misclassified examples), and
`python -m resnet_dist.evaluate --checkpoint PATH [--out DIR] [KEY=VALUE ...]`.

Runs alone or under torchrun / srun / accelerate: the same numbers for any world size (each rank takes an
unpadded shard, one all-reduce, the count checked). The model and its input pipeline are rebuilt from the
checkpoint's own config; KEY=VALUE overrides choose only the test data and how fast it is read (data.root,
data.mirror, data.test_subset, data.eval_batch_size, dist.timeout_s) and are listed in the JSON.
Rank 0 prints overall and per-class accuracy and the confusion matrix, writes <checkpoint>.eval.json and
<checkpoint>.confusion.png (next to the checkpoint, or in --out), and its last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, cli, config, distributed, files, launchcheck
from .amp import autocast_for, resolve_precision
from .data import eval_shard, normalize
from .distributed import DistEnv
from .errors import RunError, UsageError
from .fashion_mnist import CLASSES, check_root, load_split, prepare
from .model import build_model, memory_format

log = logging.getLogger("resnet_dist.evaluate")  # not __name__: run as __main__ by python -m
CLASS_KEYS = tuple(c.lower().replace("-", "_").replace("/", "_").replace(" ", "_") for c in CLASSES)
PANEL_IMAGES, PANEL_SCAN = 16, 256  # up to 16 errors among the first 256 test images: cheap at any size


@dataclass
class Evaluator:
    """How a model is evaluated: input size, batch, flip TTA, precision and memory format, decided once."""

    resize: int | None
    batch_size: int
    tta_flip: bool
    precision: str
    device: torch.device
    memory_format: torch.memory_format
    num_classes: int = len(CLASSES)

    @classmethod
    def from_config(cls, cfg: config.Config, device: torch.device) -> Evaluator:
        return cls(
            cfg.data.resize,
            cfg.data.eval_batch_size,
            cfg.train.tta_flip,
            resolve_precision(cfg.train.precision, device),
            device,
            memory_format(device),
        )

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, cache: bool = True) -> torch.Tensor:
        """Float logits of a batch of uint8 images (model in eval mode): normalize, resize, optional flip TTA.
        `cache=False`: autocast without its cast cache (inside a CUDA graph capture)."""
        x = normalize(images, self.resize).contiguous(memory_format=self.memory_format)
        with autocast_for(self.precision, self.device, cache):
            out = model(x).float()
            if self.tta_flip:  # average the logits of the image and its mirror
                out = (out + model(x.flip(-1)).float()) / 2
        return out

    def sums(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, shard: slice
    ) -> torch.Tensor:
        """[loss sum, confusion matrix (n x n, flattened)] of a shard, float64 on the device, batch by batch."""
        n = self.num_classes
        out_sums = torch.zeros(1 + n * n, dtype=torch.float64, device=images.device)
        for i in range(shard.start, shard.stop, self.batch_size):
            j = min(i + self.batch_size, shard.stop)
            out, y = self.predict(model, images[i:j]), labels[i:j]
            out_sums[0] += F.cross_entropy(out, y, reduction="sum").double()
            out_sums[1:] += torch.bincount(y * n + out.argmax(1), minlength=n**2).double()
        return out_sums

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, env: DistEnv, graphed=None
    ) -> dict:
        """Exact test metrics: each rank takes an unpadded shard; (loss sum, confusion matrix) is all-reduced
        once. `graphed`: a GraphedEvaluation of this model, which replays instead of launching each batch."""
        was_training, n = model.training, self.num_classes
        model.eval()
        shard = eval_shard(len(labels), env.rank, env.world_size)
        local = graphed.sums(images, labels, shard) if graphed else self.sums(model, images, labels, shard)
        total = distributed.all_reduce_sum(local).cpu()
        model.train(was_training)
        conf = total[1:].view(n, n).round().long()  # rows: true class, columns: predicted
        count = int(conf.sum())
        assert count == len(labels), (
            f"evaluation counted {count} images, the split has {len(labels)}: shards overlap"
        )
        right, seen = conf.diag().tolist(), conf.sum(1).tolist()
        result = {
            "test/loss": float(total[0]) / count,
            "test/acc": float(conf.diag().sum()) / count,
            "test/samples": count,
        }
        # a class without a test image (a small data.test_subset) has no accuracy: None (JSON null), not 0.0
        result.update({f"test/acc/{k}": r / s if s else None for k, r, s in zip(CLASS_KEYS, right, seen)})
        result["confusion"] = conf.tolist()
        return result

    @torch.no_grad()
    def misclassified(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        limit: int = PANEL_IMAGES,
        scan: int = PANEL_SCAN,
    ) -> list[tuple]:
        """(uint8 image [H, W], true class, predicted class) for up to `limit` errors among the first `scan` images.

        No collectives: the plain module in eval mode, on one rank.
        """
        was_training = model.training
        model.eval()
        x, y = images[:scan], labels[:scan]
        pred = self.predict(model, x).argmax(1)  # as the evaluation predicts
        model.train(was_training)
        wrong = (pred != y).nonzero().flatten()[:limit].tolist()
        return [
            (x[i].reshape(x.shape[-2], x.shape[-1]).cpu().numpy(), int(y[i]), int(pred[i])) for i in wrong
        ]


def load_model(state: dict, cfg: config.Config, device: torch.device) -> nn.Module:
    """The model a checkpoint evaluates: its EMA weights when the run had them, else the model's."""
    model = build_model(cfg.model)
    model.load_state_dict(checkpoint.evaluated_weights(state))
    return model.to(device, memory_format=memory_format(device))


# What evaluate and export take as KEY=VALUE: where the test data comes from, how much of it, how fast it
# is read. The rest (the model, the input size, TTA, precision, ...) is the checkpoint's: anything else
# would measure another model or another input pipeline than the run evaluated.
OVERRIDABLE = ("data.root", "data.mirror", "data.test_subset", "data.eval_batch_size", "dist.timeout_s")


def check_overrides(overrides, tool: str) -> dict:
    """{key: text} of the overrides; ConfigError in one line for a key outside OVERRIDABLE."""
    given = dict(config.parse_override(o) for o in overrides)
    refused = next((k for k in given if k not in OVERRIDABLE), None)
    if refused:
        raise config.ConfigError(
            f"override '{refused}': {tool} takes only {', '.join(OVERRIDABLE)} (the test data and how fast "
            "it is read); the model, input pipeline, TTA and precision come from the checkpoint"
        )
    return given


def checkpoint_config(state: dict, overrides, tool: str = "evaluate") -> config.Config:
    """The training run's config (from the checkpoint), then the overrides, of OVERRIDABLE only: no launch
    checks (the batch size of training need not divide this world size, its data.mirror need not exist
    here)."""
    check_overrides(overrides, tool)
    cfg = config.apply_overrides(config.from_dict(state["config"]), overrides)
    if cfg.data.mirror is not None and not Path(cfg.data.mirror).is_dir():
        cfg.data.mirror = None  # the training machine's mirror: fall back to Debian's copy or a download
    return cfg


def report(result: dict, path: Path) -> str:
    """Human-readable: overall and per-class accuracy, then the confusion matrix (rows true, columns predicted)."""
    conf = result["confusion"]
    lines = [
        f"checkpoint {path}: test accuracy {result['test/acc']:.4f}, loss {result['test/loss']:.4f} "
        f"on {result['test/samples']} images",
        "per-class accuracy:",
    ]
    keys = [k for k in result if k.startswith("test/acc/")]
    for i, (name, k, row) in enumerate(zip(CLASSES, keys, conf)):
        acc = "no images" if result[k] is None else f"{result[k]:.4f}"
        lines.append(f"  {name:<12} {acc}  ({row[i]}/{sum(row)})")
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    width = max(5, len(str(max(map(max, conf)))) + 1)
    lines.append(" " * 13 + "".join(f"{i:>{width}}" for i in range(len(conf))))
    for i, row in enumerate(conf):
        lines.append(f"  {i} {CLASSES[i][:9]:<9}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def output_files(path: Path, out: Path) -> tuple[Path, Path]:
    """<checkpoint>.eval.json and <checkpoint>.confusion.png in `out`."""
    return out / f"{path.stem}.eval.json", out / f"{path.stem}.confusion.png"


def write_outputs(result: dict, summary: dict, path: Path, out: Path) -> None:
    """Rank 0: the report, <checkpoint>.eval.json, <checkpoint>.confusion.png, and the JSON line last."""
    out.mkdir(parents=True, exist_ok=True)
    print(report(result, path), flush=True)
    json_path, png_path = output_files(path, out)
    text = json.dumps({**summary, "classes": list(CLASSES), "confusion": result["confusion"]}, indent=1)
    files.write_text(json_path, text + "\n")
    written = [json_path]
    try:
        from .plots import plot_confusion

        written.append(plot_confusion(result["confusion"], png_path, f"{path.name}, step {summary['step']}"))
    except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
        log.warning(f"no confusion PNG ({type(e).__name__}: {e})")
    print("wrote " + ", ".join(map(str, written)), flush=True)
    print(json.dumps(summary), flush=True)  # the last line: one JSON object for scripts


def main(argv=None) -> int:
    p = cli.checkpoint_parser(
        "evaluate",
        __doc__,
        "a checkpoint file (e.g. runs/NAME/checkpoints/last.pt)",
        "folder for the JSON and PNG (default: the checkpoint's folder)",
    )
    args = cli.parse(p, sys.argv[1:] if argv is None else argv)
    env = None
    try:
        path = cli.checkpoint_file(args.checkpoint)
        out = cli.out_folder(args.out or str(path.parent), "--out" if args.out else "the checkpoint's folder")
        for f in output_files(path, out):
            if f.is_dir():
                raise UsageError(
                    f"{f} is a folder: evaluate writes a file there (remove it, or choose another --out)"
                )
        given = check_overrides(args.overrides, "evaluate")  # before the checkpoint: cheaper
        state = checkpoint.load(path)  # weights_only: a crafted file cannot run code
        cfg = checkpoint_config(state, args.overrides)
        check_root(cfg.data.root)
        applied = {k: config.flat(cfg.to_dict())[k] for k in given}
        env = launchcheck.start(cfg.dist.timeout_s, cfg.dist.backend)
        cli.setup_logging(env.is_main)
        raw = prepare(cfg.data.root, cfg.data.mirror)  # one process prepares, under a lock
        test_x, test_y = (t.to(env.device) for t in load_split(raw, "test", cfg.data.test_subset))
        evaluator = Evaluator.from_config(cfg, env.device)
        result = evaluator.evaluate(load_model(state, cfg, env.device), test_x, test_y, env)
        if env.is_main:
            summary = {k: v for k, v in result.items() if k != "confusion"}
            summary.update(
                checkpoint=str(path),
                step=state["progress"]["global_step"],
                epoch=state["progress"]["epoch"],
                world_size=env.world_size,
                precision=evaluator.precision,
                overrides=applied,  # their values as applied (a data.mirror missing here: null)
            )
            write_outputs(result, summary, path, out)
        return 0
    except (UsageError, RunError) as e:
        return cli.report(e, env)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
