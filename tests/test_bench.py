"""The benchmark command: a short CPU run prints the table and writes valid JSON, in every mode."""

import json

import pytest
import torch

from resnet_dist import bench

from .helpers import call, run, torchrun

SHORT = [
    "--steps",
    "2",
    "--warmup",
    "1",
    "train.batch_size=32",
    "data.train_subset=256",
    "data.test_subset=64",
]


def check(result: dict, mode: str, world: int):
    assert result["mode"] == mode and result["world_size"] == world
    assert result["images_per_s"] > 0 and result["images_per_s_per_rank"] == pytest.approx(
        result["images_per_s"] / world
    )
    s = result["step_ms"]
    assert s["total"] == pytest.approx(s["data"] + s["compute"] + s["allreduce_wait"])
    assert result["train_gflop_per_image"] == pytest.approx(
        0.197, abs=0.01
    )  # 28x28, 7x7 stem (performance notes)
    assert result["mfu"] is None and result["peak_tflops_per_rank"] is None  # CPU: no known peak


@pytest.mark.parametrize("mode", ["trainer", "bare", "torchvision"])
def test_bench_single_process(tmp_path, data_root, mode):
    """`python -m resnet_dist.bench` in this process."""
    out = tmp_path / "b.json"
    args = ["--mode", mode, "--workers", "1", "--out", str(out), *SHORT, f"data.root={data_root}"]
    code, printed, err = call(bench.main, *args)
    assert code == 0, err
    assert "images/s total" in printed and "step ms: all-reduce wait" in printed
    check(json.loads(out.read_text()), mode, 1)


@pytest.mark.processes
def test_bench_two_ranks_reports_allreduce_wait_and_stragglers(tmp_path, data_root):
    out = tmp_path / "b.json"
    proc = run(
        torchrun(2, module="resnet_dist.bench") + ["--out", str(out), *SHORT, f"data.root={data_root}"]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("images/s total") == 1  # rank 0 only
    r = json.loads(out.read_text())
    check(r, "trainer", 2)
    assert r["step_ms"]["allreduce_wait"] >= 0 and 0 <= r["straggler"]["spread_pct"] < 100


def test_bench_bad_arguments_exit_2(tmp_path):
    code, _, _ = call(bench.main, "--steps", "0", "--out", str(tmp_path / "b.json"))
    assert code == 2 and not (tmp_path / "b.json").exists()
    code, _, err = call(bench.main, "train.lr=-1", "--out", str(tmp_path / "b.json"))
    assert code == 2 and "train.lr" in err


@pytest.mark.parametrize(
    "name, precision, tf32, want",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", True, 989.4),
        ("NVIDIA H100 PCIe", "bf16", True, 756.5),
        ("NVIDIA H100 NVL", "bf16", True, 835.5),
        ("NVIDIA H200", "fp16", False, 989.4),
        ("NVIDIA H200", "fp32", True, 494.7),
        ("NVIDIA H200", "fp32", False, 66.9),
        ("NVIDIA L4", "bf16", True, 121.0),
        ("NVIDIA L40", "bf16", True, 181.0),
        ("NVIDIA L40S", "bf16", True, 362.0),
        ("Tesla V100-SXM2-16GB", "fp32", True, 15.7),  # no TF32 before Ampere
        ("NVIDIA H100", "bf16", True, None),
        ("NVIDIA GeForce RTX 3060", "bf16", True, None),  # unknown: no guess
    ],
)
def test_peak_by_exact_gpu_name(name, precision, tf32, want):
    from resnet_dist.perf import peak_tflops

    assert peak_tflops(name, precision, tf32) == want


def test_matmul_ceiling_is_measured():
    from resnet_dist.perf import matmul_ceiling_tflops

    assert matmul_ceiling_tflops(torch.device("cpu"), n=128, iters=2) > 0


def test_sweep_of_per_gpu_batches_in_one_process(tmp_path, data_root, capsys):
    """--batches: the trainer at each per-GPU batch, eager and as configured (on a CPU, eager both times)."""
    out = tmp_path / "s.json"
    assert bench.main(["--batches", "8,16", "--out", str(out), *SHORT, f"data.root={data_root}"]) == 0
    runs = json.loads(out.read_text())["sweep"]
    assert [(r["global_batch"], r["step"]) for r in runs] == [
        (8, "eager (train.cuda_graphs=off)"),
        (8, "eager (not on a GPU)"),
        (16, "eager (train.cuda_graphs=off)"),
        (16, "eager (not on a GPU)"),
    ]
    assert all(r["images_per_s"] > 0 and r["gpu_busy"] is None for r in runs)
    assert capsys.readouterr().out.splitlines()[0].split() == [
        "per-GPU",
        "batch",
        "step",
        "images/s",
        "step",
        "ms",
        "GPU",
        "busy",
    ]


def test_gpu_busy_is_the_union_of_kernel_time_over_the_span():
    from resnet_dist.perf import busy_share

    # kernels at 0-2, 1-3 (overlapping: 3 busy), 6-7; the host's work spans 0-10: 40% busy
    assert busy_share([(0, 2), (1, 3), (6, 7)], [(0, 10)]) == pytest.approx(0.4)
    assert busy_share([], [(0, 10)]) is None
