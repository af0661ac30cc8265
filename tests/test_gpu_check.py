"""launch/gpu_check.sh, the first command of a GPU session, run end to end in its dry mode on CPU so it cannot rot."""

import json

from .helpers import run


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    proc = run(
        ["bash", "launch/gpu_check.sh"],
        timeout=400,
        GPU_CHECK_DRY=1,
        OUT=out,
        GPU_CHECK_WORK=tmp_path / "work",
        DATA="/usr/share/datasets/fashion-mnist",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.txt", "results.json"} <= set(files), files
    assert not list(out.rglob("*.pt"))  # no checkpoints in the output
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("versions: torch ") and "DRY RUN" in summary[0]
    for step in (
        "selftest:",
        "smoke_bf16: OK",
        "bench_trainer_ema:",
        "bench_trainer_no_ema:",
        "bench_bare:",
        "fast: final-epoch test acc",
        "seed224_ours:",
        "seed224_torchvision:",
        "what one GPU cannot test",
    ):
        assert any(line.startswith(step) for line in summary), (step, summary)
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True and results["steps"]["fast"]["time_split"]["train_s"] > 0
    assert results["steps"]["bench_bare"]["images_per_s"] > 0
