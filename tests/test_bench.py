"""The benchmark command: a short CPU run prints the table and writes valid JSON, in every mode."""
import json

import pytest

from .conftest import PY, run, torchrun

SHORT = ["--steps", "2", "--warmup", "1", "train.batch_size=32", "data.train_subset=256", "data.test_subset=64"]


def check(result: dict, mode: str, world: int):
    assert result["mode"] == mode and result["world_size"] == world
    assert result["images_per_s"] > 0 and result["images_per_s_per_rank"] == pytest.approx(result["images_per_s"] / world)
    s = result["step_ms"]
    assert s["total"] == pytest.approx(s["data"] + s["compute"] + s["allreduce_wait"])
    assert result["train_gflop_per_image"] == pytest.approx(0.197, abs=0.01)  # 28x28, 7x7 stem (performance notes)
    assert result["mfu"] is None and result["peak_tflops_per_rank"] is None  # CPU: no known peak


@pytest.mark.parametrize("mode", ["trainer", "bare", "torchvision"])
def test_bench_single_process(tmp_path, data_root, mode):
    out = tmp_path / "b.json"
    proc = run([PY, "-m", "resnet_dist.bench", "--mode", mode, "--workers", "1", "--out", str(out), *SHORT,
                f"data.root={data_root}"])
    assert proc.returncode == 0, proc.stderr
    assert "images/s total" in proc.stdout and "step ms: all-reduce wait" in proc.stdout
    check(json.loads(out.read_text()), mode, 1)


def test_bench_two_ranks_reports_allreduce_wait_and_stragglers(tmp_path, data_root):
    out = tmp_path / "b.json"
    proc = run(torchrun(2, module="resnet_dist.bench") + ["--out", str(out), *SHORT, f"data.root={data_root}"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("images/s total") == 1  # rank 0 only
    r = json.loads(out.read_text())
    check(r, "trainer", 2)
    assert r["step_ms"]["allreduce_wait"] >= 0 and 0 <= r["straggler"]["spread_pct"] < 100


def test_bench_bad_arguments_exit_2(tmp_path):
    proc = run([PY, "-m", "resnet_dist.bench", "--steps", "0", "--out", str(tmp_path / "b.json")])
    assert proc.returncode == 2 and not (tmp_path / "b.json").exists()
    proc = run([PY, "-m", "resnet_dist.bench", "train.lr=-1", "--out", str(tmp_path / "b.json")])
    assert proc.returncode == 2 and "train.lr" in proc.stderr
