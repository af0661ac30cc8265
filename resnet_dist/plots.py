"""Pictures without W&B: training curves from metrics.jsonl and the test confusion matrix, as PNG.

Rank 0 writes `curves.png` and `confusion.png` into the run directory at the end of every run.
On demand, from a checkpoint (its history holds one confusion matrix per epoch):

    python -m resnet_dist.plots --checkpoint runs/NAME/checkpoints/last.pt [--out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import cli, files  # noqa: E402
from .errors import UsageError  # noqa: E402
from .fashion_mnist import CLASSES  # noqa: E402


def epoch_records(metrics_path: Path) -> list[dict]:
    """The end-of-epoch records of metrics.jsonl; a resumed run's repeated epoch keeps its last record."""
    by_epoch = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("kind") == "epoch":
                    by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_curves(records: list[dict], out: Path) -> Path:
    """Loss and accuracy against epoch, train and test."""
    x = [r["epoch"] + 1 for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, what in zip(axes, ("loss", "acc")):
        for split, style in (("train", "o-"), ("test", "s-")):
            ax.plot(x, [r[f"{split}/{what}"] for r in records], style, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if what == "acc" else "loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    last = records[-1]
    fig.suptitle(
        f"epoch {last['epoch'] + 1}: test accuracy {last['test/acc']:.4f} ({last['test/samples']} images)"
    )
    return _save(fig, out)


def plot_confusion(confusion: list[list[int]], out: Path, title: str = "test confusion matrix") -> Path:
    """Counts, rows = true class, columns = predicted class; each cell annotated; as a PNG file."""
    return _save(confusion_figure(confusion, title), out)


def confusion_figure(confusion: list[list[int]], title: str = "test confusion matrix"):
    """The confusion-matrix figure (matplotlib), for a PNG or a logger."""
    n = len(confusion)
    names = CLASSES[:n] if n <= len(CLASSES) else [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(8, 7), constrained_layout=True)
    im = ax.imshow(confusion, cmap="Blues")
    top = max(max(row) for row in confusion) or 1
    for i in range(n):
        for j in range(n):
            v = confusion[i][j]
            ax.text(
                j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black"
            )
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    # a true class without a test image (a small data.test_subset) has no accuracy: its row says so
    ax.set_yticks(
        range(n), [f"{name} (no images)" if not sum(confusion[i]) else name for i, name in enumerate(names)]
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(n))
    ax.set_title(f"{title}: {correct}/{total} correct ({correct / max(total, 1):.4f})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # a reader never sees half
    plt.close(fig)
    return out


def write_run_plots(run_dir: Path, history: list[dict], out: Path | None = None) -> list[Path]:
    """curves.png (from run_dir/metrics.jsonl) and confusion.png (the newest epoch in `history`)."""
    out = run_dir if out is None else out
    written = []
    records = epoch_records(run_dir / "metrics.jsonl")
    if records:
        written.append(plot_curves(records, out / "curves.png"))
    if history:
        last = history[-1]
        written.append(
            plot_confusion(
                last["confusion"], out / "confusion.png", f"test confusion matrix, epoch {last['epoch'] + 1}"
            )
        )
    return written


def main(argv=None) -> int:
    p = cli.checkpoint_parser(
        "plots",
        __doc__,
        "a checkpoint of the run (its run directory holds metrics.jsonl)",
        "folder for the PNGs (default: the run directory)",
    )
    args = p.parse_args(argv)
    from . import checkpoint

    try:
        path = cli.checkpoint_file(args.checkpoint)
        run_dir = path.resolve().parent.parent  # <run_dir>/checkpoints/<file>
        out = cli.out_folder(args.out or str(run_dir), "--out" if args.out else "the run directory")
        for f in (out / "curves.png", out / "confusion.png"):
            if f.is_dir():
                raise UsageError(
                    f"{f} is a folder: plots writes a file there (remove it, or choose another --out)"
                )
        state = checkpoint.load(path)
    except UsageError as e:
        return cli.report(e)
    written = write_run_plots(run_dir, state.get("history") or [], out)
    for w in written:
        print(f"wrote {w}")
    if not written:
        print("nothing to plot: no finished epoch in this checkpoint or metrics.jsonl", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
