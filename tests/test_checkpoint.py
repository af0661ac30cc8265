"""checkpoint.py: atomic files a kill cannot tear, and loading that never runs code."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from resnet_dist import checkpoint

from .helpers import PY, REPO, clean_env


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/resnet_dist_pwned",))


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    marker = Path("/tmp/resnet_dist_pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "step-00000001.pt"
    torch.save({"model": {}, "progress": {}, "evil": Evil()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a valid checkpoint"):
        checkpoint.load(path)
    assert checkpoint.load_newest(tmp_path) is None
    assert not marker.exists()


KILLER = """
import sys, torch
from pathlib import Path
from resnet_dist import checkpoint
state = {"model": {"w": torch.randn(4_000_000)}, "progress": {"global_step": 0}}
step = 0
while True:
    step += 1
    state["progress"]["global_step"] = step
    checkpoint.save(state, Path(sys.argv[1]), step, keep=3)
    print(step, flush=True)
"""


def test_kill_during_save_never_leaves_a_partial_file(tmp_path):
    ck = tmp_path / "ck"
    for delay in (0.0, 0.02, 0.05, 0.1):  # 16 MB saves take ~0.05-0.2 s: kills land mid-write
        proc = subprocess.Popen(
            [PY, "-c", KILLER, str(ck)], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE
        )
        proc.stdout.readline()  # one save done, the next under way
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        names = [p.name for p in ck.iterdir()]
        assert "last.pt" in names and any(n.startswith("step-") for n in names)
        for name in names:
            if name.endswith(".pt"):  # every file under a checkpoint name loads completely
                assert checkpoint.load(ck / name)["model"]["w"].numel() == 4_000_000
        newest = checkpoint.load_newest(ck)
        assert newest is not None and newest[1].name.startswith("step-")


def _tiny_state(step: int, value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "progress": {"global_step": step}}


def test_newest_is_last_pt_when_the_step_files_are_gone_or_older(tmp_path):
    checkpoint.save(_tiny_state(4), tmp_path, 4, keep=5)
    checkpoint.save(_tiny_state(8), tmp_path, 8, keep=5)
    assert checkpoint.load_newest(tmp_path)[1].name == "step-00000008.pt"  # last.pt: the same file
    (tmp_path / "step-00000008.pt").unlink()
    state, path = checkpoint.load_newest(tmp_path)
    assert path.name == "last.pt" and state["progress"]["global_step"] == 8
    for p in checkpoint.step_files(tmp_path):
        p.unlink()
    assert checkpoint.load_newest(tmp_path)[1].name == "last.pt"


def test_non_finite_weights_are_not_a_checkpoint(tmp_path):
    checkpoint.save(_tiny_state(2), tmp_path, 2, keep=5)
    checkpoint.save(_tiny_state(4, float("nan")), tmp_path, 4, keep=5)
    with pytest.raises(checkpoint.CheckpointError, match="not finite"):
        checkpoint.load(tmp_path / "step-00000004.pt")
    assert checkpoint.load_newest(tmp_path)[1].name == "step-00000002.pt"  # skipped, with a warning
