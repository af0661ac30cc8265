"""Resume that loses nothing: real torchrun restarts, real signals, real killed processes."""
import math
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from resnet_dist import checkpoint
from resnet_dist.config import load as load_config
from resnet_dist.distributed import DistEnv
from resnet_dist.trainer import Trainer

from .conftest import PY, REPO, clean_env, epochs, free_port, in_gloo_group, read_metrics, run, small_run, torchrun

# 512 images, global batch 64 on 2 ranks: 8 steps per epoch, 24 in all; logs every 3 steps and
# checkpoints every 2, so a checkpoint can fall inside a log interval (its partial sums must carry over)
RESUME = ("train.epochs=3", "checkpoint.every_steps=2", "checkpoint.keep=3", "train.momentum=0.9",
          "train.schedule=onecycle", "train.warmup=0.2", "data.crop_padding=2", "data.flip=true", "data.erasing=0.3")


def comparable(records):
    """Every logged value but wall-clock speed."""
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def assert_same_metrics(a, b):
    ca, cb = comparable(a), comparable(b)
    assert [r.keys() for r in ca] == [r.keys() for r in cb]
    for ra, rb in zip(ca, cb):
        for k in ra:
            if isinstance(ra[k], float):
                assert abs(ra[k] - rb[k]) <= 1e-6, (k, ra, rb)
            else:
                assert ra[k] == rb[k], (k, ra, rb)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """The uninterrupted 2-rank run every interrupted one must reproduce."""
    d = tmp_path_factory.mktemp("ref")
    proc = run(torchrun(2) + small_run(data_root, d, "ref", *RESUME))
    assert proc.returncode == 0, proc.stderr
    return read_metrics(d / "ref")


def worker_pid(tag: str, rank: int, timeout: float = 60) -> int:
    """The pid of the training process of `rank` among the processes launched with TEST_TAG=tag."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if (f"TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env
                    and b"resnet_dist.train" in cmd and b"torch.distributed.run" not in cmd):
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process found")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def launch(cmd, **env):
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_sigkilled_rank_restarts_and_matches_uninterrupted(tmp_path, data_root, reference):
    """No run.name: the restarted workers find their first attempt's directory by torchrun's run id."""
    tag = uuid.uuid4().hex
    proc = launch(torchrun(2, "--max-restarts=1", "--monitor-interval=0.2", f"--rdzv-id={tag}")
                  + small_run(data_root, tmp_path, "k", *RESUME, "run.name=null"), TEST_TAG=tag)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/checkpoints/step-00000004.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    os.kill(worker_pid(tag, 1), signal.SIGKILL)  # mid-epoch 0 (8 steps), after the step-4 checkpoint
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed at step" in out  # the second attempt resumed rather than started over
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # one run directory, timestamped
    assert (run_dir / ".torchrun_id").read_text() == tag
    assert_same_metrics(read_metrics(run_dir), reference)


def preempted_at(out: str) -> int:
    assert out.count("preempted: checkpoint saved at step") == 1, out
    return int(out.split("checkpoint saved at step ")[1].split(";")[0])


def test_signals_checkpoint_exit_cleanly_and_restarts_match(tmp_path, data_root, reference):
    """SIGUSR1 to one rank, then SIGTERM to the torchrun agent (which forwards it), then a restart to the end."""
    args = small_run(data_root, tmp_path, "u", *RESUME)
    tag = uuid.uuid4().hex
    proc = launch(torchrun(2) + args, TEST_TAG=tag)
    wait_for(tmp_path / "u" / "checkpoints" / "step-00000002.pt", proc)
    os.kill(worker_pid(tag, 1), signal.SIGUSR1)  # one rank only: the other learns it through the agreement
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    first = preempted_at(out)
    assert 2 < first < 24
    state = checkpoint.load(tmp_path / "u" / "checkpoints" / "last.pt")
    assert state["progress"]["global_step"] == first and len(state["rng"]) == 2  # both ranks took part
    assert max(r["step"] for r in read_metrics(tmp_path / "u")) <= first

    proc = launch(torchrun(2) + args)
    wait_for(tmp_path / "u" / "checkpoints" / f"step-{first + 2 - first % 2:08d}.pt", proc)
    proc.send_signal(signal.SIGTERM)  # to torchrun itself, as SLURM or a container runtime would
    out, err = proc.communicate(timeout=300)
    assert f"resumed at step {first}" in out
    second = preempted_at(out)
    assert first < second < 24
    assert checkpoint.load(tmp_path / "u" / "checkpoints" / "last.pt")["progress"]["global_step"] == second

    again = run(torchrun(2) + args)
    assert again.returncode == 0, again.stderr
    assert f"resumed at step {second}" in again.stdout
    assert_same_metrics(read_metrics(tmp_path / "u"), reference)


def test_resume_on_another_world_size_keeps_the_global_batch(tmp_path, data_root):
    first = run(torchrun(2) + small_run(data_root, tmp_path, "w", *RESUME, "train.epochs=1"))
    assert first.returncode == 0, first.stderr
    second = run([PY, "-m", "resnet_dist.train"] + small_run(data_root, tmp_path, "w", *RESUME, "train.epochs=2"))
    assert second.returncode == 0, second.stderr
    assert "resumed at step 8" in second.stdout
    ep = epochs(read_metrics(tmp_path / "w"))
    assert [(r["epoch"], r["world_size"], r["step"]) for r in ep] == [(0, 2, 8), (1, 1, 16)]


def test_truncated_newest_checkpoint_falls_back_and_another_model_is_refused(tmp_path, data_root):
    args = small_run(data_root, tmp_path, "t", "train.epochs=1", "checkpoint.every_steps=3")
    first = run([PY, "-m", "resnet_dist.train"] + args)
    assert first.returncode == 0, first.stderr
    ckpts = tmp_path / "t" / "checkpoints"
    # saved at steps 3, 6 and 8 (epoch end); checkpoint.keep=2 keeps the newest two
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step-00000006.pt", "step-00000008.pt"]
    assert (ckpts / "last.pt").samefile(ckpts / "step-00000008.pt") or \
        (ckpts / "last.pt").read_bytes() == (ckpts / "step-00000008.pt").read_bytes()
    newest = ckpts / "step-00000008.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    other = run([PY, "-m", "resnet_dist.train"] + args + ["model.stem=cifar"])
    assert other.returncode == 1  # the fallback checkpoint is from another model: refused, in one line
    assert "refusing to load" in other.stderr.splitlines()[-1]

    again = run([PY, "-m", "resnet_dist.train"] + args + ["train.epochs=2"])
    assert again.returncode == 0, again.stderr
    warnings = [l for l in again.stderr.splitlines() if "step-00000008.pt" in l]
    assert len(warnings) == 1 and "not a valid checkpoint" in warnings[0]
    assert "resumed at step 6" in again.stdout
    assert [r["epoch"] for r in epochs(read_metrics(tmp_path / "t"))] == [0, 1]


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


def _tiny_trainer(data_root, run_dir, *overrides):
    cfg = load_config(None, small_run(data_root, run_dir, "rt", *RESUME, *overrides), world_size=1)
    env = DistEnv(rank=0, local_rank=0, world_size=1, launcher="none", device=torch.device("cpu"), backend=None)
    trainer = Trainer(cfg, env, run_dir / "rt")
    # fp16 autocast is very slow on CPU: an enabled GradScaler over fp32 math gives the scaler a real state
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    return trainer


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def test_state_round_trip_of_every_part(tmp_path, data_root):
    a = _tiny_trainer(data_root, tmp_path)
    batches = a.batches.epoch(0, a.gen)
    for _ in range(3):
        a.train_step(*next(batches))
        a.step_in_epoch += 1
        a.global_step += 1
    a.wandb_id = "abc123"
    saved = a.state_dict()
    assert not any(k.startswith("module.") for k in saved["model"])
    assert {"model", "optimizer", "scheduler", "scaler", "progress", "rng", "config", "world_size",
            "wandb_id"} <= saved.keys()
    assert saved["scaler"]["scale"] == 2048.0 and saved["optimizer"]["state"]  # scaler grew once; momentum buffers
    path = checkpoint.save(saved, tmp_path / "ck", a.global_step, keep=2)
    b = _tiny_trainer(data_root, tmp_path, "run.seed=5")  # different seed: everything must come from the file
    b.load_state_dict(checkpoint.load(path))
    again = b.state_dict()
    flat_a, flat_b = dict(_flat(saved)), dict(_flat(again))
    flat_a.pop("/config/run/seed"), flat_b.pop("/config/run/seed")
    assert flat_a.keys() == flat_b.keys()
    for k, v in flat_a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, flat_b[k]), k
        else:
            assert v == flat_b[k], k
    # and the next step is the same in both
    xa, ya = next(a.batches.epoch(0, a.gen, start_step=3))
    xb, yb = next(b.batches.epoch(0, b.gen, start_step=3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


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
        proc = subprocess.Popen([PY, "-c", KILLER, str(ck)], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE)
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


def test_killed_peer_makes_the_survivor_fail_within_the_timeout(tmp_path, data_root):
    port, tag = free_port(), uuid.uuid4().hex
    args = small_run(data_root, tmp_path, "p", "train.epochs=50", "dist.timeout_s=20")
    procs = [launch([PY, "-m", "resnet_dist.train", *args], RANK=r, LOCAL_RANK=r, WORLD_SIZE=2,
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TEST_TAG=tag) for r in (0, 1)]
    wait_for(tmp_path / "p" / "checkpoints" / "last.pt", procs[0])
    procs[1].kill()
    t0 = time.time()
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode not in (0, None)
    assert time.time() - t0 < 20 + 30
    last = [l for l in err.splitlines() if l.strip()][-1]
    assert "another rank died" in last, err[-2000:]
    procs[1].communicate()


def _trainer(data_root, run_dir, *overrides):
    """An in-process single-process trainer on 32 real images at 8x8 pixels: fp16 / bf16 on CPU are slow."""
    cfg = load_config(None, small_run(data_root, run_dir, "x", "data.train_subset=32", "train.batch_size=8",
                                      "data.resize=8", "data.test_subset=16", "train.momentum=0.9", "data.flip=true",
                                      "data.erasing=0.5", *overrides), world_size=1)
    env = DistEnv(rank=0, local_rank=0, world_size=1, launcher="none", device=torch.device("cpu"), backend=None)
    return Trainer(cfg, env, run_dir / "x")


def _steps(trainer, n):
    it = trainer.batches.epoch(trainer.epoch, trainer.gen, start_step=trainer.step_in_epoch)
    for _ in range(n):
        trainer.train_step(*next(it))
        trainer.step_in_epoch += 1
        trainer.global_step += 1
    loss, _ = trainer.interval.tolist()
    assert math.isfinite(loss)


def test_resume_across_precisions(tmp_path, data_root):
    """fp32 -> fp16 (an enabled GradScaler gets the fp32 run's empty scaler state) -> bf16 -> fp32."""
    a = _trainer(data_root, tmp_path, "train.precision=fp32")
    _steps(a, 1)
    state = a.state_dict()
    assert state["scaler"] == {}
    b = _trainer(data_root, tmp_path, "train.precision=fp16")
    b.load_state_dict(state)  # a fresh GradScaler rather than "the source state dict is empty"
    _steps(b, 1)
    state = b.state_dict()
    assert state["scaler"]["scale"] > 0
    c = _trainer(data_root, tmp_path, "train.precision=bf16")
    c.load_state_dict(state)  # the fp16 run's scaler state into a disabled scaler: ignored
    assert not c.scaler.is_enabled() and c.global_step == 2
    d = _trainer(data_root, tmp_path, "train.precision=fp32")
    d.load_state_dict(c.state_dict())
    _steps(d, 1)
    assert [(g["fused"], g["foreach"]) for g in d.optimizer.param_groups] == [(None, True)] * 2


def test_augmentation_stream_from_another_device_is_reseeded(tmp_path, data_root, capsys):
    a = _trainer(data_root, tmp_path)
    _steps(a, 1)
    state = a.state_dict()
    for opt_group in state["optimizer"]["param_groups"]:  # as a bf16 run on a GPU saves them
        opt_group.update(fused=True, foreach=None)
    # a CUDA generator's state: 16 bytes (seed and offset), which a CPU generator cannot take
    state["rng"][0].update(augment=torch.zeros(16, dtype=torch.uint8), augment_device="cuda")
    b, c = _trainer(data_root, tmp_path), _trainer(data_root, tmp_path)
    b.load_state_dict(state)
    out = capsys.readouterr().out
    assert "saved on cuda and cannot be restored on cpu: reseeded from run.seed and step 1" in out
    c.load_state_dict(state)
    assert torch.equal(b.gen.get_state(), c.gen.get_state())  # deterministic: the same stream every time
    assert [(g["fused"], g["foreach"]) for g in b.optimizer.param_groups] == [(None, True)] * 2  # this device's
    _steps(b, 1)
    # an older checkpoint without the device key, but with a GPU's state: also reseeded
    del state["rng"][0]["augment_device"]
    d = _trainer(data_root, tmp_path)
    d.load_state_dict(state)
    assert torch.equal(d.gen.get_state(), c.gen.get_state())


@pytest.mark.parametrize("overrides, saved_steps", [
    (("checkpoint.every_epochs=2", "checkpoint.max_overhead=1"), [8, 16, 20]),  # epochs 2 and 4, and the last one
    (("checkpoint.max_overhead=0.0001",), [4, 20]),  # the first epoch (nothing measured yet), then only the last
])
def test_epoch_end_checkpoint_cadence(tmp_path, data_root, overrides, saved_steps):
    trainer = _trainer(data_root, tmp_path, "train.epochs=5", "checkpoint.keep=10", *overrides)
    assert trainer.fit() == "done"
    assert [int(p.name[5:13]) for p in reversed(checkpoint.step_files(tmp_path / "x" / "checkpoints"))] == saved_steps


def test_compile_without_a_compiler_trains_eagerly_with_one_warning(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc, c++ ... here
    monkeypatch.delenv("CXX", raising=False)
    trainer = _trainer(data_root, tmp_path, "train.compile=true")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: train.compile=true needs a compiler toolchain, but there "
                                               "is no C++ compiler"), err
    assert trainer.forward is trainer.ddp  # not compiled
    _steps(trainer, 1)


def _gradient_ops_of_a_ddp_step(env, data_root, run_dir):
    import collections

    cfg = load_config(None, small_run(data_root, run_dir, "g", "data.train_subset=64", "train.batch_size=16",
                                      "train.momentum=0.9"), world_size=2)
    trainer = Trainer(cfg, env, None)
    it = trainer.batches.epoch(0, trainer.gen)
    for _ in range(2):  # DDP rebuilds its buckets after the first step
        trainer.train_step(*next(it))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_step(*next(it))
    ops = collections.Counter(e.name for e in prof.events())
    return ops["aten::div_"], len(list(trainer.model.parameters()))


def test_ddp_gradients_are_zeroed_in_place(tmp_path, data_root):
    """Zeroed in place (not set to None), the gradients stay views of DDP's buckets: the reducer averages
    each one there (a div_ per gradient) instead of multiplying it into a new tensor and copying it back."""
    for in_place_divs, params in in_gloo_group(_gradient_ops_of_a_ddp_step, 2, data_root, tmp_path):
        assert in_place_divs >= params
