"""log.tensorboard: rank 0's scalars and confusion matrices in TensorBoard's format, read back with TensorBoard's
own reader; a run killed after a checkpoint and resumed shows every step once."""

import signal

import pytest

from .held import marker
from .helpers import HELD, PY, epochs, hold, launch, read_metrics, run, small_run, wait_for


@pytest.mark.processes
def test_scalars_and_confusion_matrices_continue_across_a_kill_without_duplicates(tmp_path, data_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = small_run(
        data_root, tmp_path, "tb", "log.tensorboard=true", "log.every_steps=1", "checkpoint.every_steps=4"
    )
    held = tmp_path / "held"
    proc = launch(HELD + args, **hold(held, "step 6"))  # held after step 6 until killed (tests/held.py)
    wait_for(marker(held, "step 6"), proc)
    proc.send_signal(signal.SIGKILL)  # after the step-4 checkpoint and the records of steps 5 and 6
    proc.communicate()
    again = run([PY, "-m", "resnet_dist.train", *args])
    assert again.returncode == 0, again.stderr
    assert "resumed at step 4" in again.stdout

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
