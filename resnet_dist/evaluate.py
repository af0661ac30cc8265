"""`python -m resnet_dist.evaluate --checkpoint PATH [--out DIR] [KEY=VALUE ...]`: exact test metrics of a checkpoint.

Runs alone or under torchrun / srun / accelerate: the same numbers for any world size (each rank takes an
unpadded shard, one all-reduce, the count checked). The model is rebuilt from the checkpoint's own config;
KEY=VALUE overrides (data.root, data.test_subset, data.eval_batch_size, ...) apply on top of it.
Rank 0 prints overall and per-class accuracy and the confusion matrix, writes <checkpoint>.eval.json and
<checkpoint>.confusion.png (next to the checkpoint, or in --out), and its last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import checkpoint, config, distributed
from .data import CLASSES, DataError, load_split, prepare


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m resnet_dist.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. runs/NAME/checkpoints/last.pt)")
    p.add_argument("--out", help="folder for the JSON and PNG (default: the checkpoint's folder)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.root=/data")
    return p.parse_intermixed_args(argv)  # options may follow the overrides


def usage_error(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def checkpoint_config(state: dict, overrides) -> config.Config:
    """The training run's config (from the checkpoint), then the overrides: no launch checks (the batch
    size of training need not divide this world size, its data.mirror need not exist here)."""
    cfg = config.from_dict(state["config"])
    for text in overrides:
        config._set(cfg, *config.parse_override(text))
    if cfg.data.mirror is not None and not Path(cfg.data.mirror).is_dir():
        cfg.data.mirror = None  # the training machine's mirror: fall back to Debian's copy or a download
    return cfg


def report(result: dict, path: Path) -> str:
    """Human-readable: overall and per-class accuracy, then the confusion matrix (rows true, columns predicted)."""
    conf = result["confusion"]
    lines = [f"checkpoint {path}: test accuracy {result['test/acc']:.4f}, loss {result['test/loss']:.4f} "
             f"on {result['test/samples']} images", "per-class accuracy:"]
    keys = [k for k in result if k.startswith("test/acc/")]
    for i, (name, k, row) in enumerate(zip(CLASSES, keys, conf)):
        lines.append(f"  {name:<12} {result[k]:.4f}  ({row[i]}/{sum(row)})")
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    width = max(5, len(str(max(map(max, conf)))) + 1)
    lines.append(" " * 13 + "".join(f"{i:>{width}}" for i in range(len(conf))))
    for i, row in enumerate(conf):
        lines.append(f"  {i} {CLASSES[i][:9]:<9}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    path = Path(args.checkpoint)
    if not path.is_file():
        usage_error(f"no checkpoint file at {path}")
    try:
        state = checkpoint.load(path)  # weights_only: a crafted file cannot run code
        cfg = checkpoint_config(state, args.overrides)
    except (checkpoint.CheckpointError, config.ConfigError) as e:
        usage_error(str(e))

    import torch
    from .model import build_model
    from .trainer import autocast_for, evaluate_model, resolve_precision

    env = distributed.setup(cfg.dist.timeout_s)
    try:
        raw = prepare(cfg.data.root, cfg.data.mirror)  # one process prepares, under a lock
        test_x, test_y = load_split(raw, "test", cfg.data.test_subset)
        model = build_model(cfg.model)
        model.load_state_dict(state["ema"]["weights"] if state.get("ema") else state["model"])  # what training evaluated
        model.to(env.device)
        if env.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        precision = resolve_precision(cfg.train.precision, env.device)
        result = evaluate_model(model, test_x.to(env.device), test_y.to(env.device), env, cfg.data.resize,
                                cfg.data.eval_batch_size, autocast_for(precision, env.device), cfg.model.num_classes,
                                cfg.train.tta_flip)
        if env.is_main:
            summary = {k: v for k, v in result.items() if k != "confusion"}
            summary.update(checkpoint=str(path), step=state["progress"]["global_step"],
                           epoch=state["progress"]["epoch"], world_size=env.world_size, precision=precision)
            out = Path(args.out) if args.out else path.parent
            out.mkdir(parents=True, exist_ok=True)
            print(report(result, path), flush=True)
            json_path = out / f"{path.stem}.eval.json"
            json_path.write_text(json.dumps({**summary, "classes": list(CLASSES), "confusion": result["confusion"]},
                                            indent=1) + "\n")
            written = [json_path]
            try:
                from .plots import plot_confusion
                written.append(plot_confusion(result["confusion"], out / f"{path.stem}.confusion.png",
                                              f"{path.name}, step {summary['step']}"))
            except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
                print(f"warning: no confusion PNG ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            print("wrote " + ", ".join(map(str, written)), flush=True)
            print(json.dumps(summary), flush=True)  # the last line: one JSON object for scripts
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
