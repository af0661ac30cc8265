"""log.tensorboard: rank 0's scalars and confusion matrices in TensorBoard's format, read back with TensorBoard's
own reader; a run killed after a checkpoint and resumed shows every step once."""

import os
import signal
import subprocess
import time

from .helpers import PY, REPO, clean_env, epochs, read_metrics, run, small_run


def test_scalars_and_confusion_matrices_continue_across_a_kill_without_duplicates(tmp_path, data_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [
        PY,
        "-m",
        "resnet_dist.train",
        *small_run(
            data_root, tmp_path, "tb", "log.tensorboard=true", "log.every_steps=1", "checkpoint.every_steps=4"
        ),
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "tb" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and any(r["step"] >= 6 for r in read_metrics(tmp_path / "tb"))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # after the step-4 checkpoint and the records of steps 5 and 6
    proc.wait()
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert "resumed at step 4" in again.stdout or "resumed at step 8" in again.stdout

    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    records = read_metrics(tmp_path / "tb")
    step_records = [r for r in records if r["kind"] == "step"]
    logged = acc.Scalars("train/loss")
    assert (
        [e.step for e in logged] == [r["step"] for r in step_records] == list(range(1, 17))
    )  # each step once
    for e, r in zip(logged, step_records):
        assert abs(e.value - r["train/loss"]) < 1e-5
    ep = epochs(records)
    assert [e.step for e in acc.Scalars("test/acc")] == [r["step"] for r in ep] == [8, 16]
    assert [e.step for e in acc.Scalars("train/epoch_loss")] == [8, 16]
    assert [e.step for e in acc.Images("test/confusion")] == [8, 16]
