"""launch/gpu_check.sh, the first command of a GPU session, run end to end in its dry mode on CPU so it cannot rot:
every figure judged against a bound, a healthy dry run passing, a forced FAIL making the check exit non-zero."""

import json
import re

import pytest

from .helpers import run

pytestmark = pytest.mark.processes

JUDGED = re.compile(r"\| (>=|<=) [\d.e+-]+: (PASS|FAIL)$")


def gpu_check(tmp_path, **env):
    out = tmp_path / "out"
    proc = run(
        ["bash", "launch/gpu_check.sh"],
        timeout=600,
        GPU_CHECK_DRY=1,
        OUT=out,
        GPU_CHECK_WORK=tmp_path / "work",
        DATA="/usr/share/datasets/fashion-mnist",
        **env,
    )
    return proc, out, (out / "summary.txt").read_text().splitlines()


def test_gpu_check_dry_run(tmp_path):
    proc, out, summary = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.txt", "results.json"} <= set(files), files
    assert not list(out.rglob("*.pt"))  # no checkpoints in the output
    assert summary[0].startswith("versions: torch ") and "DRY RUN" in summary[0]
    judged = {line.split(":")[0]: line for line in summary if JUDGED.search(line)}
    for name in (
        "smoke_bf16",  # 4 epochs, and the same resumed from step 10: identical
        "smoke_fp16",
        "fast_bf16_acc",
        "fast_fp16_acc",
        "fast_bf16_eager_acc",
        "fp16_vs_bf16",
        "captured_vs_eager",  # on a CPU both eager: the same numbers
        "fast_time",
        "fast_wall",
        "two_ranks",  # 2 gloo ranks: logged accuracy = evaluate's on the checkpoint
        "seed224_acc",
        "sweep_64",  # per-GPU batches, eager against captured (on a CPU: eager twice)
        "sweep_128",
        "sweep_256",
        "bench_trainer_no_ema",
        "bench_bare",
        "seed224_ours",
        "seed224_torchvision",
    ):
        assert name in judged and judged[name].endswith("PASS"), (name, summary)
    assert "the same" in judged["smoke_bf16"]
    assert any(line.startswith("selftest: all_reduce self-test") for line in summary)
    assert any(line.startswith("what one GPU cannot test") for line in summary)
    (forecast,) = [line for line in summary if line.startswith("forecast (a model, not a measurement)")]
    assert "2 GPUs NVLink" in forecast and "8 GPUs PCIe Gen5" in forecast
    assert re.match(r"gpu_check: (\d+) of \1 figures PASS; done in", summary[-1]), summary[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True and results["steps"]["fast_bf16"]["time_split"]["train_s"] > 0
    assert results["checks"]["fp16_vs_bf16"]["value"] == 0.0  # the dry run trains both in fp32
    assert results["steps"]["bench_bare"]["images_per_s"] > 0
    table = results["forecast"]["table"]
    assert set(table) == {f"{n}x {link}" for n in (2, 4, 8) for link in ("NVLink", "PCIe Gen5")}
    assert results["forecast"]["gradient_bytes"] == 4 * 11_175_818  # ResNet-18, cifar stem, 10 classes


def test_a_figure_below_its_bound_fails_the_check(tmp_path):
    proc, _, summary = gpu_check(tmp_path, GPU_CHECK_ONLY="seed224", GPU_CHECK_BOUNDS='{"seed224": 1.01}')
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in summary if x.startswith("seed224_acc:")]
    assert line.endswith("| >= 1.01: FAIL")
    assert summary[-1].startswith("gpu_check: 0 of 1 figures PASS; FAIL: seed224_acc")
