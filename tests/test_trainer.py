"""The Trainer in-process: fit() on synthetic tensors, its state round trip, resume across precisions and
devices, the checkpoint cadence, DDP's in-place gradients, the preemption agreement."""

import collections
import itertools
import math
import os
import time

import pytest
import torch

from resnet_dist import amp, checkpoint, optim
from resnet_dist.config import load as load_config
from resnet_dist.data import Splits, load_splits
from resnet_dist.distributed import DistEnv
from resnet_dist.loggers import NullLogger
from resnet_dist.metrics import Diverged
from resnet_dist.preemption import Preemption
from resnet_dist.trainer import Outcome, Trainer

from .helpers import RESUME, in_gloo_group, small_run, without_timing

CPU_ENV = DistEnv(
    rank=0, local_rank=0, world_size=1, launcher="none", device=torch.device("cpu"), backend=None
)


def _tiny_trainer(data_root, run_dir, *overrides, meta=None):
    cfg = load_config(None, small_run(data_root, run_dir, "rt", *RESUME, *overrides), world_size=1)
    trainer = Trainer(cfg, CPU_ENV, load_splits(cfg.data, CPU_ENV.device), run_dir / "rt", meta=meta)
    # fp16 autocast is very slow on CPU: an enabled loss scaler over fp32 math gives the scaler a real state
    trainer.amp = amp.LossScaler(trainer.model, CPU_ENV.device, init_scale=1024.0, growth_interval=2)
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
    a = _tiny_trainer(data_root, tmp_path, meta={"wandb_id": "abc123"})
    batches = a.batches.epoch(0, a.gen)
    for _ in range(3):
        a.train_step(*next(batches))
        a.step_in_epoch += 1
        a.global_step += 1
    saved = a.state_dict()
    assert not any(k.startswith("module.") for k in saved["model"])
    assert {
        "model",
        "optimizer",
        "scaler",
        "progress",
        "rng",
        "config",
        "world_size",
        "wandb_id",
    } <= saved.keys()
    assert (
        saved["scaler"]["scaler"]["scale"] == 2048.0 and saved["optimizer"]["state"]
    )  # scaler grew once; momentum buffers
    path = checkpoint.save(saved, tmp_path / "ck", a.global_step, keep=2)
    b = _tiny_trainer(data_root, tmp_path, "run.seed=5", meta={"wandb_id": "abc123"})  # all from the file
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


def _trainer(data_root, run_dir, *overrides):
    """An in-process single-process trainer on 32 real images at 8x8 pixels: fp16 / bf16 on CPU are slow."""
    cfg = load_config(
        None,
        small_run(
            data_root,
            run_dir,
            "x",
            "data.train_subset=32",
            "train.batch_size=8",
            "data.resize=8",
            "data.test_subset=16",
            "train.momentum=0.9",
            "data.flip=true",
            "data.erasing=0.5",
            *overrides,
        ),
        world_size=1,
    )
    return Trainer(cfg, CPU_ENV, load_splits(cfg.data, CPU_ENV.device), run_dir / "x")


def _steps(trainer, n):
    it = trainer.batches.epoch(trainer.epoch, trainer.gen, start_step=trainer.step_in_epoch)
    for _ in range(n):
        trainer.train_step(*next(it))
        trainer.step_in_epoch += 1
        trainer.global_step += 1
    loss, _ = trainer.meter.sums.tolist()
    assert math.isfinite(loss)


def test_resume_across_precisions(tmp_path, data_root):
    """fp32 -> fp16 (an enabled GradScaler gets the fp32 run's empty scaler state) -> bf16 -> fp32."""
    a = _trainer(data_root, tmp_path, "train.precision=fp32")
    _steps(a, 1)
    state = a.state_dict()
    assert state["scaler"] is None
    b = _trainer(data_root, tmp_path, "train.precision=fp16")
    b.load_state_dict(state)  # a fresh GradScaler rather than "the source state dict is empty"
    _steps(b, 1)
    state = b.state_dict()
    assert state["scaler"]["scaler"]["scale"] > 0
    c = _trainer(data_root, tmp_path, "train.precision=bf16")
    c.load_state_dict(state)  # the fp16 run's scaler state into a disabled scaler: ignored
    assert not c.amp.enabled and c.global_step == 2
    d = _trainer(data_root, tmp_path, "train.precision=fp32")
    d.load_state_dict(c.state_dict())
    _steps(d, 1)
    assert [(g["fused"], g["foreach"]) for g in d.optimizer.param_groups] == [(True, None)] * 2


def test_augmentation_stream_from_another_device_is_reseeded(tmp_path, data_root, capsys):
    a = _trainer(data_root, tmp_path)
    _steps(a, 1)
    state = a.state_dict()
    for opt_group in state["optimizer"]["param_groups"]:  # as an fp16 run saves them
        opt_group.update(fused=None, foreach=True)
    # a CUDA generator's state: 16 bytes (seed and offset), which a CPU generator cannot take
    state["rng"][0].update(augment=torch.zeros(16, dtype=torch.uint8), augment_device="cuda")
    b, c = _trainer(data_root, tmp_path), _trainer(data_root, tmp_path)
    b.load_state_dict(state)
    out = capsys.readouterr().out
    assert "saved on cuda and cannot be restored on cpu: reseeded from run.seed and the step" in out
    c.load_state_dict(state)
    assert torch.equal(b.gen.get_state(), c.gen.get_state())  # deterministic: the same stream every time
    assert [(g["fused"], g["foreach"]) for g in b.optimizer.param_groups] == [(True, None)] * 2  # this run's
    _steps(b, 1)
    # an older checkpoint without the device key, but with a GPU's state: also reseeded
    del state["rng"][0]["augment_device"]
    d = _trainer(data_root, tmp_path)
    d.load_state_dict(state)
    assert torch.equal(d.gen.get_state(), c.gen.get_state())


@pytest.mark.parametrize(
    "overrides, saved_steps",
    [
        (
            ("checkpoint.every_epochs=2", "checkpoint.max_overhead=1"),
            [8, 16, 20],
        ),  # epochs 2 and 4, and the last one
        (
            ("checkpoint.max_overhead=0.0001",),
            [4, 20],
        ),  # the first epoch (nothing measured yet), then only the last
    ],
)
def test_epoch_end_checkpoint_cadence(tmp_path, data_root, overrides, saved_steps):
    trainer = _trainer(data_root, tmp_path, "train.epochs=5", "checkpoint.keep=10", *overrides)
    assert trainer.fit() is Outcome.DONE
    assert [
        int(p.name[5:13]) for p in reversed(checkpoint.step_files(tmp_path / "x" / "checkpoints"))
    ] == saved_steps


def _gradient_ops_of_a_ddp_step(env, data_root, run_dir):
    cfg = load_config(
        None,
        small_run(
            data_root, run_dir, "g", "data.train_subset=64", "train.batch_size=16", "train.momentum=0.9"
        ),
        world_size=2,
    )
    trainer = Trainer(cfg, env, load_splits(cfg.data, env.device))
    it = trainer.batches.epoch(0, trainer.gen)
    for _ in range(2):  # DDP rebuilds its buckets after the first step
        trainer.train_step(*next(it))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_step(*next(it))
    ops = collections.Counter(e.name for e in prof.events())
    return ops["aten::div_"], len(list(trainer.model.parameters()))


@pytest.mark.processes
def test_ddp_gradients_are_zeroed_in_place(tmp_path, data_root):
    """Zeroed in place (not set to None), the gradients stay views of DDP's buckets: the reducer averages
    each one there (a div_ per gradient) instead of multiplying it into a new tensor and copying it back."""
    for in_place_divs, params in in_gloo_group(_gradient_ops_of_a_ddp_step, 2, data_root, tmp_path):
        assert in_place_divs >= params


def synthetic(n_train: int = 64, n_test: int = 40, seed: int = 0) -> Splits:
    """Random images whose class is their brightness: learnable in a few steps, no dataset needed."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = (y.view(n, 1, 1, 1) * 25 + torch.randint(0, 25, (n, 1, 28, 28), generator=g)).to(torch.uint8)
        return x, y

    return Splits(*split(n_train), *split(n_test))


class Recorder(NullLogger):
    """Keeps what the trainer logs; raises the preemption flag at a chosen step, as a signal would."""

    def __init__(self, preemption=None, at_step=None):
        self.records, self.media, self.preemption, self.at_step = [], [], preemption, at_step

    def log(self, record, media=None):
        self.records.append(record)
        if media is not None:
            self.media.append(media)
        if self.preemption is not None and record["step"] == self.at_step:
            self.preemption.received = True


SYNTH = (
    "data.train_subset=null",
    "data.test_subset=null",
    "train.batch_size=16",
    "train.epochs=2",
    "log.every_steps=1",
    "data.eval_batch_size=16",
    "train.momentum=0.9",
    "train.lr=0.05",
)


def test_fit_in_process_on_synthetic_tensors(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", *SYNTH], world_size=1)
    log = Recorder()
    trainer = Trainer(cfg, CPU_ENV, synthetic(), tmp_path / "s", log)
    assert trainer.fit() is Outcome.DONE
    kinds = collections.Counter(r["kind"] for r in log.records)
    assert kinds == {"step": 8, "epoch": 2}  # 64 images / 16 = 4 steps per epoch
    ep = [r for r in log.records if r["kind"] == "epoch"]
    assert [(r["epoch"], r["step"], r["test/samples"]) for r in ep] == [(0, 4, 40), (1, 8, 40)]
    assert [m.epoch for m in log.media] == [0, 1] and sum(map(sum, log.media[-1].confusion)) == 40
    assert log.media[-1].misclassified == []  # no logger asked for images: no inference spent on them
    assert [p.name for p in checkpoint.step_files(tmp_path / "s" / "checkpoints")] == [
        "step-00000008.pt",
        "step-00000004.pt",
    ]
    assert set(trainer.time_split()) == {"train", "eval", "save"}


def test_signal_in_process_stops_at_the_next_step_with_a_checkpoint(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", *SYNTH], world_size=1)
    preemption = Preemption(CPU_ENV)  # not installed: the recorder raises its flag at step 3
    trainer = Trainer(cfg, CPU_ENV, synthetic(), tmp_path / "s", Recorder(preemption, at_step=3), preemption)
    assert trainer.fit() is Outcome.PREEMPTED
    assert trainer.global_step == 3
    state = checkpoint.load(tmp_path / "s" / "checkpoints" / "last.pt")
    assert state["progress"]["global_step"] == 3 and state["progress"]["step_in_epoch"] == 3


def _fit_with_a_signal_on_rank_1(env, run_dir):
    cfg = load_config(
        None, [f"run.dir={run_dir}", *SYNTH], world_size=2
    )  # 8 images per rank, 4 steps per epoch
    preemption = Preemption(env)
    log = Recorder(preemption if env.rank == 1 else None, at_step=2)  # rank 1 alone gets the signal
    trainer = Trainer(cfg, env, synthetic(), run_dir / "s" if env.is_main else None, log, preemption)
    return trainer.fit(), trainer.global_step


@pytest.mark.processes
def test_a_signal_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """The agreement in a real 2-rank gloo group: raised on rank 1 at step 2, read one step later by both."""
    assert in_gloo_group(_fit_with_a_signal_on_rank_1, 2, tmp_path) == [(Outcome.PREEMPTED, 3)] * 2
    assert checkpoint.load(tmp_path / "s" / "checkpoints" / "last.pt")["progress"]["global_step"] == 3


def test_a_resumed_interval_keeps_its_time(tmp_path):
    """images/s of an interval cut by a checkpoint counts the time before the checkpoint too."""
    from resnet_dist.metrics import TrainMeter

    a = TrainMeter(torch.device("cpu"), global_batch=16)
    a.start_clock()
    a.add(torch.tensor(1.0), torch.zeros(16, 10), torch.zeros(16, dtype=torch.long))
    a.count_step()
    time.sleep(0.2)
    state = a.state_dict()
    b = TrainMeter(torch.device("cpu"), global_batch=16)
    b.load_state_dict(state, is_main=True)
    b.start_clock()
    b.add(torch.tensor(1.0), torch.zeros(16, 10), torch.zeros(16, dtype=torch.long))
    b.count_step()
    assert state["interval_time"] >= 0.2
    assert b.flush()["images_per_s"] <= 32 / 0.2  # 2 steps of 16 in at least 0.2 s


def test_tiny_epochs_do_not_write_a_checkpoint_each(tmp_path, monkeypatch):
    """Epochs of a few batches with a save that costs more than they do: the default max_overhead (5%) skips
    epoch-end saves until enough time has passed; the last epoch still saves. The clock is the test's: each
    save takes 100 s on it (a slow disk, a big model), so the 1900 s the cadence waits for never pass."""
    real_clock, skew = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skew[0])
    real_save, saves = checkpoint.save, []

    def slow_save(*args, **kwargs):
        skew[0] += 100.0
        saves.append(args[2])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    cfg = load_config(
        None, [f"run.dir={tmp_path}", *SYNTH, "train.epochs=6", "checkpoint.keep=10"], world_size=1
    )
    trainer = Trainer(cfg, CPU_ENV, synthetic(), tmp_path / "s")
    assert trainer.fit() is Outcome.DONE
    saved = [int(p.name[5:13]) for p in checkpoint.step_files(tmp_path / "s" / "checkpoints")]
    assert sorted(saved) == saves == [4, 24]  # the first epoch (nothing measured yet) and the last


# ---- gradient accumulation ---------------------------------------------------------------------------------
def _one_step_on_my_half(env, x, y):
    """2 ranks, no accumulation: rank r trains on half r of the batch."""
    cfg = load_config(None, ["run.dir=/nonexistent", *SYNTH, "train.batch_size=16"], world_size=2)
    trainer = Trainer(cfg, env, synthetic())
    half = slice(8 * env.rank, 8 * (env.rank + 1))
    trainer.train_step(x[half], y[half])
    return {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()}  # by value through the queue


@pytest.mark.processes
def test_accumulation_equals_ranks():
    """One optimizer step of 1 rank with accum_steps=2 = 2 gloo ranks on the same two micro-batches."""
    data = synthetic(n_train=16)
    x, y = data.train_x.float().div(255).sub(0.286).div(0.353), data.train_y
    two_ranks = {k: torch.from_numpy(v) for k, v in in_gloo_group(_one_step_on_my_half, 2, x, y)[0].items()}
    cfg = load_config(
        None, ["run.dir=/nonexistent", *SYNTH, "train.batch_size=16", "train.accum_steps=2"], world_size=1
    )
    one = Trainer(cfg, CPU_ENV, data)
    one.train_step(x, y)
    params = dict(one.model.named_parameters())
    for name in params:
        assert torch.allclose(params[name], two_ranks[name], atol=1e-5, rtol=1e-5), name  # float noise
    # and not by accident: the same batch without accumulation (BatchNorm over 16) takes another step
    plain = Trainer(
        load_config(None, ["run.dir=/nonexistent", *SYNTH, "train.batch_size=16"], world_size=1),
        CPU_ENV,
        data,
    )
    plain.train_step(x, y)
    assert not all(torch.allclose(p, two_ranks[n], atol=1e-5) for n, p in plain.model.named_parameters())


def test_resume_is_exact_with_accumulation(tmp_path):
    args = [
        f"run.dir={tmp_path}",
        *SYNTH,
        "train.accum_steps=2",
        "data.flip=true",
        "data.erasing=0.3",
        "train.epochs=2",
    ]
    cfg = load_config(None, [*args, "run.name=whole"], world_size=1)
    whole = Recorder()
    assert Trainer(cfg, CPU_ENV, synthetic(), tmp_path / "whole", whole).fit() is Outcome.DONE

    cfg = load_config(None, [*args, "run.name=cut"], world_size=1)
    preemption = Preemption(CPU_ENV)
    first = Recorder(preemption, at_step=3)  # a signal in the middle of an epoch (and of no accumulation)
    assert Trainer(cfg, CPU_ENV, synthetic(), tmp_path / "cut", first, preemption).fit() is Outcome.PREEMPTED
    second = Recorder()
    resumed = Trainer(cfg, CPU_ENV, synthetic(), tmp_path / "cut", second)
    resumed.load_state_dict(checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt"))
    assert resumed.fit() is Outcome.DONE

    assert without_timing(first.records + second.records) == without_timing(whole.records)


# ---- SyncBatchNorm, determinism -----------------------------------------------------------------------------
def test_sync_bn_checkpoints_load_either_way():
    """PyTorch's SyncBatchNorm runs on CUDA only (CPU: "SyncBatchNorm expected input tensor to be on GPU"), so
    the 2-rank equivalence is for the GPU; here: the conversion, and checkpoints in both directions."""
    from resnet_dist.config import ModelConfig
    from resnet_dist.model import build_model

    torch.manual_seed(0)
    plain = build_model(ModelConfig())
    with torch.no_grad():
        plain(torch.randn(8, 1, 28, 28))  # BatchNorm statistics worth carrying
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model(ModelConfig()))
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == 17
    assert not any(
        isinstance(m, torch.nn.BatchNorm2d) and not isinstance(m, torch.nn.SyncBatchNorm)
        for m in synced.modules()
    )
    synced.load_state_dict(plain.state_dict())
    back = build_model(ModelConfig())
    back.load_state_dict(synced.state_dict())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), plain.eval()(x)) and torch.equal(synced.eval()(x), plain(x))
    # a checkpoint of either kind resumes in a run of the other kind; another stem is refused
    from resnet_dist import resume

    saved = load_config(None, ["model.sync_bn=true"]).to_dict()
    assert resume.changes(saved, load_config(None, [])) == [("model.sync_bn", True, False, "applied")]
    ((key, *_, verdict),) = resume.changes(
        saved, load_config(None, ["model.sync_bn=true", "model.stem=cifar"])
    )
    assert key == "model.stem" and verdict.startswith("refused")


def test_deterministic_mode_sets_every_switch(monkeypatch):
    from resnet_dist.device import configure_backends

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        configure_backends(torch.device("cuda"), deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]


# ---- live straggler figures ----------------------------------------------------------------------------------
def _interval_figures(env, slow_rank, delay_s):
    cfg = load_config(None, ["run.dir=/nonexistent", *SYNTH, "train.epochs=1"], world_size=2)
    log = Recorder()
    trainer = Trainer(cfg, env, synthetic(), None, log)
    if env.rank == slow_rank:  # a straggler: this rank's forward pass takes delay_s longer
        trainer.model.register_forward_pre_hook(lambda module, args: time.sleep(delay_s))
    trainer.fit()
    return [r for r in log.records if r["kind"] == "step"]


@pytest.mark.processes
def test_a_slow_rank_shows_in_the_straggler_ratio():
    """Each interval gathers every rank's own forward time in the interval's one collective: rank 1, slowed by
    0.3 s a step, is the slowest by far; the all-reduce would hide it from wall times."""
    steps = in_gloo_group(_interval_figures, 2, 1, 0.3)[0]
    assert len(steps) == 4
    for r in steps:
        assert r["time/slowest_s"] >= 0.3 and r["time/fastest_s"] > 0, r
        # DDP rebuilds its buckets in the second step's forward, a one-off collective that makes rank 0 wait
        if r["step"] != 2:
            assert r["time/straggler"] > 2 and r["time/fastest_s"] < 0.3, r
    assert "mfu" not in steps[0]  # a GPU figure: no datasheet peak for a CPU


# ---- fp16: the loss scaler ----------------------------------------------------------------------------------
FP16 = (*SYNTH, "train.precision=fp16", "data.resize=8", "train.ema_decay=0.9")  # real fp16 autocast on CPU
# fp16 kernels are very slow on CPU: the other tests of the scaler's logic run it over fp32 math
SCALED = (*SYNTH, "train.precision=fp32", "data.resize=8", "train.ema_decay=0.9")


def overflow_at(trainer, steps: set[int]) -> list[int]:
    """Make the forward pass of the given steps (1-based, counting forward passes in train mode) overflow: under
    fp16 the stem's input is scaled past 65504, as large activations would; over fp32 math it is made inf. The
    loss scaler starts at a scale of 64, where this tiny model's gradients never overflow by themselves."""
    count, factor = [0], 1e6 if trainer.precision == "fp16" else math.inf
    trainer.amp = amp.LossScaler(trainer.model, CPU_ENV.device, init_scale=64.0)
    # fp16's SGD (foreach: a step the scaler skips leaves it untouched), wherever the trainer holds it
    fp16_sgd = optim.make_optimizer(trainer.model, trainer.cfg.train, CPU_ENV.device, "fp16")
    trainer.optimizer = trainer.parts.optimizer = trainer.schedule.optimizer = fp16_sgd

    def hook(module, args):
        if not module.training:
            return None
        count[0] += 1
        return (args[0] * factor,) if count[0] in steps else None

    trainer.model[0][0].register_forward_pre_hook(hook)
    return count


def test_fp16_skipped_step_leaves_no_trace_and_every_logger_sees_it(tmp_path, monkeypatch):
    """A forward pass that overflows fp16 poisons the BatchNorm statistics before GradScaler skips the step:
    they are put back, the step's loss is left out, and amp/scale + amp/skipped reach metrics.jsonl,
    TensorBoard and W&B; no lr_scheduler warning from the skipped step."""
    import warnings

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from resnet_dist import tensorboard_logger, wandb_logger
    from resnet_dist.loggers import JsonlLogger, MultiLogger

    from .helpers import read_metrics
    from .wandb_reader import read_run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "s"
    run_dir.mkdir()
    # one epoch of 4 steps: a backward in real fp16 takes over a second on a CPU
    cfg = load_config(
        None, [f"run.dir={tmp_path}", *FP16, "log.wandb.mode=offline", "train.epochs=1"], world_size=1
    )
    wb = wandb_logger.start(cfg, run_dir, "s")
    rec = Recorder()
    logger = MultiLogger(
        rec, JsonlLogger(run_dir / "metrics.jsonl"), tensorboard_logger.start(run_dir, None), wb
    )
    trainer = Trainer(cfg, CPU_ENV, synthetic(), run_dir, logger)
    overflow_at(trainer, {2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trainer.fit() is Outcome.DONE  # without the buffer restore: "the weights are not finite"
    logger.close()
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    steps = [r for r in rec.records if r["kind"] == "step"]
    assert [r["amp/skipped"] for r in steps] == [0, 1, 0, 0]
    assert [r["amp/scale"] for r in steps[:3]] == [64.0, 32.0, 32.0]  # halved by the overflow
    assert steps[1]["train/loss"] is None and all(r["train/loss"] > 0 for r in steps if r is not steps[1])
    assert trainer.amp.skipped_total == 1 and "fp16: 1 of 4 steps skipped" in trainer.amp.summary(4)
    assert all(t.isfinite().all() for t in trainer.model.state_dict().values())
    assert all(t.isfinite().all() for t in trainer.ema.module.state_dict().values())
    assert [r["amp/skipped"] for r in read_metrics(run_dir) if r["kind"] == "step"] == [0, 1, 0, 0]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("amp/skipped")] == [0, 1, 0, 0]
    assert [e.step for e in acc.Scalars("amp/scale")] == list(range(1, 5))
    assert 2 not in [e.step for e in acc.Scalars("train/loss")]  # not measured: not logged as a number
    by_step = {}
    for row in read_run(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))).history:
        by_step.setdefault(row["_step"], {}).update(row)
    assert [by_step[s]["amp/skipped"] for s in range(1, 5)] == [0, 1, 0, 0]
    assert by_step[2]["amp/scale"] == 32.0 and "train/loss" not in by_step[2]


def test_fp16_skipped_step_keeps_every_tensor(tmp_path):
    """The skipped step itself: weights, BatchNorm statistics and counters, momentum and EMA as before."""
    cfg = load_config(None, [f"run.dir={tmp_path}", *SCALED], world_size=1)
    trainer = Trainer(cfg, CPU_ENV, synthetic(), None)
    overflow_at(trainer, {1})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(*next(trainer.batches.epoch(0, trainer.gen)))
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.optimizer.state and trainer.ema.count == 0 and trainer.amp.skipped_total == 1
    trainer.train_step(*next(trainer.batches.epoch(0, trainer.gen, start_step=1)))  # the next one trains
    assert trainer.ema.count == 1 and trainer.optimizer.state and trainer.amp.skipped_total == 1


def test_fp16_that_overflows_in_every_step_stops_with_one_line(tmp_path):
    cfg = load_config(
        None,
        [f"run.dir={tmp_path}", *SCALED, "train.batch_size=2", "log.every_steps=6", "train.epochs=1"],
        world_size=1,
    )
    trainer = Trainer(cfg, CPU_ENV, synthetic(), tmp_path / "s")
    overflow_at(trainer, set(range(1, 100)))
    with pytest.raises(Diverged, match=r"fp16 overflowed in each of the last 24 steps .*bf16"):
        trainer.fit()
    assert trainer.global_step == 24  # the 4th interval of 6: a scale of 2^-8
    assert not checkpoint.step_files(tmp_path / "s" / "checkpoints")


def test_fp16_scaler_state_and_skips_carry_over_a_resume(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", *SCALED, "log.every_steps=3"], world_size=1)
    a = Trainer(cfg, CPU_ENV, synthetic(), None)
    overflow_at(a, {2})
    for x, y in itertools.islice(a.batches.epoch(0, a.gen), 3):
        a.train_step(x, y)
        a.global_step += 1
        a.step_in_epoch += 1
    state = a.state_dict()
    b = Trainer(cfg, CPU_ENV, synthetic(), None)
    b.amp = amp.LossScaler(b.model, CPU_ENV.device)  # as a fresh fp16 run starts: the checkpoint's scale wins
    b.load_state_dict(state)
    assert b.amp.scaler.get_scale() == a.amp.scaler.get_scale() == 32.0
    assert (b.amp.skipped, b.amp.skipped_total) == (
        1,
        1,
    )  # the open interval's skip is logged after the resume
    assert b.amp.interval_record() == {"amp/scale": 32.0, "amp/skipped": 1}
