"""PNG pictures without W&B: curves and confusion matrix at the end of a run, and on demand from a checkpoint."""

import json
import struct

import torch
from matplotlib import image as mpimg

from resnet_dist import plots

from .helpers import call


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header; also checks it is a PNG and decodes it."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    w, h = struct.unpack(">II", data[16:24])
    img = mpimg.imread(path)
    assert img.shape[:2] == (h, w) and img.std() > 0  # decodes, and is not a blank canvas
    return w, h


def test_plots_from_records(tmp_path):
    recs = [
        {"kind": "step", "step": 3, "epoch": 0, "train/loss": 2.0},
        *(
            {
                "kind": "epoch",
                "epoch": e,
                "step": 10 * (e + 1),
                "train/loss": 1 / (e + 1),
                "train/acc": 0.5 + e / 10,
                "test/loss": 1.2 / (e + 1),
                "test/acc": 0.45 + e / 10,
                "test/samples": 100,
            }
            for e in range(3)
        ),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    conf = [[10 if i == j else 0 for j in range(10)] for i in range(10)]
    written = plots.write_run_plots(tmp_path, [{"epoch": 2, "confusion": conf}])
    assert [p.name for p in written] == ["curves.png", "confusion.png"]
    for p in written:
        w, h = png_size(p)
        assert w >= 400 and h >= 300


def test_end_of_run_pngs_and_confusion_counts(trained):
    w, h = png_size(trained / "curves.png")
    assert w >= 400 and h >= 300
    w, h = png_size(trained / "confusion.png")
    assert w >= 400 and h >= 400
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    assert sum(map(sum, state["history"][-1]["confusion"])) == 999  # the whole test split (data.test_subset)


def test_plots_on_demand_from_a_checkpoint(trained, tmp_path):
    """`python -m resnet_dist.plots` in this process."""
    code, _, err = call(
        plots.main, "--checkpoint", str(trained / "checkpoints" / "last.pt"), "--out", str(tmp_path)
    )
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "curves.png"]
    assert png_size(tmp_path / "curves.png") == png_size(trained / "curves.png")
