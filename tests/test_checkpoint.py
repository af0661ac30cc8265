"""checkpoint.py: atomic files a kill cannot tear, and loading that never runs code."""

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from resnet_dist import checkpoint


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


def _save_forever(state: dict, folder: Path, out_fd: int) -> None:
    """In a forked process: `state` saved under ever higher steps, each step written to out_fd once saved."""
    step = 0
    while True:
        step += 1
        state["progress"]["global_step"] = step
        checkpoint.save(state, folder, step, keep=3)
        os.write(out_fd, f"{step}\n".encode())


@pytest.mark.processes
def test_kill_during_save_never_leaves_a_partial_file(tmp_path, trained):
    """Processes forked from this one (the checkpoint already loaded), SIGKILLed while they save."""
    ck = tmp_path / "ck"
    state = checkpoint.load(
        trained / "checkpoints" / "last.pt"
    )  # a real one: ~45 MB, each save takes a while
    keys = state["model"].keys()
    fork = mp.get_context("fork")
    for delay in (0.0, 0.02, 0.05, 0.1):  # 45 MB saves take ~0.1-0.5 s: kills land mid-write
        read, write = os.pipe()
        proc = fork.Process(target=_save_forever, args=(state, ck, write))
        proc.start()
        os.close(write)
        with os.fdopen(read) as saved:
            assert saved.readline()  # one save done, the next under way
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
        names = [p.name for p in ck.iterdir()]
        assert "last.pt" in names and any(n.startswith("step-") for n in names)
        for name in names:
            if name.endswith(".pt"):  # every file under a checkpoint name loads completely
                assert checkpoint.load(ck / name)["model"].keys() == keys
        newest = checkpoint.load_newest(ck)
        assert newest is not None and newest[1].name.startswith("step-")


@pytest.fixture
def state_at(trained):
    """A real checkpoint's state with its step set (and its weights set to `value`, e.g. NaN)."""
    state = checkpoint.load(trained / "checkpoints" / "last.pt")

    def at(step: int, value: float | None = None) -> dict:
        state["progress"]["global_step"] = step
        if value is not None:
            state["model"] = {
                k: torch.full_like(t, value) if t.is_floating_point() else t
                for k, t in state["model"].items()
            }
        return state

    return at


def test_newest_is_last_pt_when_the_step_files_are_gone_or_older(tmp_path, state_at):
    checkpoint.save(state_at(4), tmp_path, 4, keep=5)
    checkpoint.save(state_at(8), tmp_path, 8, keep=5)
    assert checkpoint.load_newest(tmp_path)[1].name == "step-00000008.pt"  # last.pt: the same file
    (tmp_path / "step-00000008.pt").unlink()
    state, path = checkpoint.load_newest(tmp_path)
    assert path.name == "last.pt" and state["progress"]["global_step"] == 8
    for p in checkpoint.step_files(tmp_path):
        p.unlink()
    assert checkpoint.load_newest(tmp_path)[1].name == "last.pt"


def test_non_finite_weights_are_not_a_checkpoint(tmp_path, state_at):
    checkpoint.save(state_at(2), tmp_path, 2, keep=5)
    checkpoint.save(state_at(4, float("nan")), tmp_path, 4, keep=5)
    with pytest.raises(checkpoint.CheckpointError, match="not finite"):
        checkpoint.load(tmp_path / "step-00000004.pt")
    assert checkpoint.load_newest(tmp_path)[1].name == "step-00000002.pt"  # skipped, with a warning


def drop(key: str):
    def damage(state):
        *parents, last = key.split(".")
        node = state
        for p in parents:
            node = node[p]
        del node[last]

    return damage


def put(key: str, value):
    def damage(state):
        *parents, last = key.split(".")
        node = state
        for p in parents:
            node = node[p]
        node[last] = value

    return damage


DAMAGES = {
    "no config": (drop("config"), "'config' is missing"),
    "no progress": (drop("progress"), "'progress' is missing"),
    "no model": (drop("model"), "'model' is missing"),
    "no global_step": (drop("progress.global_step"), "'progress.global_step' is missing"),
    "no model config": (drop("config.model"), "'config.model' is missing"),
    "progress a string": (put("progress", "8"), "'progress' is a str, not a dict"),
    "step a string": (put("progress.epoch", "1"), "'progress.epoch' is a str, not int"),
    "no optimizer": (drop("optimizer"), "'optimizer' is missing"),
    "no rng": (drop("rng"), "'rng' is missing"),
    "history of strings": (put("history", ["x"]), "'history[0]' is a str, not a dict"),
    "a tensor less": (
        lambda s: s["model"].pop("0.0.weight"),
        "'model' does not fit its model config: it lacks 0.0.weight",
    ),
    "a tensor reshaped": (
        lambda s: s["model"].update({"0.0.weight": torch.zeros(3)}),
        "'model.0.0.weight' has shape [3]",
    ),
    "empty": (lambda s: s.clear(), "'model' is missing"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_an_incomplete_checkpoint_is_one_line_in_every_tool(damage, trained, data_root, tmp_path, capsys):
    """A checkpoint without a key the tools read, or with one of the wrong type: evaluate, export, predict,
    plots and a resume each refuse it with one line naming the file and the key, exit 2."""
    from resnet_dist import evaluate, export, plots, predict, train

    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    fn, words = DAMAGES[damage]
    fn(state)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(checkpoint.CheckpointError, match="not a complete resnet_dist checkpoint"):
        checkpoint.load(bad)
    out = tmp_path / "out"
    for main, args in [
        (evaluate.main, ["--checkpoint", str(bad), "--out", str(out), f"data.root={data_root}"]),
        (export.main, ["--checkpoint", str(bad), "--out", str(out)]),
        (predict.main, ["--model", str(bad), str(trained / "curves.png")]),
        (plots.main, ["--checkpoint", str(bad), "--out", str(out)]),
        (
            train.main,
            [f"data.root={data_root}", f"run.dir={tmp_path}", "run.name=r", f"checkpoint.resume={bad}"],
        ),
    ]:
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (main.__module__, line)
        assert line == f"error: {bad}: not a complete resnet_dist checkpoint: {words}" or (
            line.startswith(f"error: {bad}: not a complete resnet_dist checkpoint: ") and words in line
        ), (main.__module__, line)
    assert not out.exists() and not (tmp_path / "r" / "checkpoints").exists()
