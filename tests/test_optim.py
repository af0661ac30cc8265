"""optim.py, each part alone: precision choice, the SGD kernel, optimizer groups and state, LR schedules, EMA,
the cuDNN and CPU memory settings."""

import copy
import math

import pytest
import torch

from resnet_dist import device
from resnet_dist.amp import resolve_precision
from resnet_dist.config import ModelConfig, TrainConfig
from resnet_dist.model import build_model
from resnet_dist.optim import (
    EMA,
    NoEMA,
    Schedule,
    load_optimizer_state,
    lr_factor,
    make_optimizer,
    optimizer_impl,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "requested, env, want",
    [
        ("auto", {}, "fp32"),
        ("auto", {"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16"),
        ("auto", {"ACCELERATE_MIXED_PRECISION": "fp16"}, "fp16"),
        ("auto", {"ACCELERATE_MIXED_PRECISION": "no"}, "fp32"),
        ("bf16", {"ACCELERATE_MIXED_PRECISION": "fp16"}, "bf16"),  # an explicit choice wins
        ("fp32", {}, "fp32"),
    ],
)
def test_resolve_precision_on_cpu(requested, env, want):
    assert resolve_precision(requested, CPU, env) == want


@pytest.mark.parametrize("major, want", [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_auto_takes_fp16_where_bf16_is_only_emulated(monkeypatch, major, want):
    """V100 and T4 (compute capability 7.x) run bf16 by emulation, without tensor cores: torch's
    is_bf16_supported() says yes to that unless asked not to. The device is simulated on the CPU."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)  # emulation works
    assert torch.cuda.is_bf16_supported()  # what `auto` asked before, on every one of them
    assert resolve_precision("auto", torch.device("cuda"), {}) == want


def test_schedule_sets_each_steps_lr_in_place():
    """The LR is a function of the step, written into the groups; a tensor LR (what a captured step reads) is
    filled in place, keeping its identity."""
    model = torch.nn.Linear(3, 2)
    t = TrainConfig(lr=0.4, schedule="onecycle", warmup=0.2)
    opt = make_optimizer(model, t, CPU, "fp32")
    schedule = Schedule(opt, t, total_steps=10)
    assert [schedule.set(s) for s in (0, 1, 2, 9)] == pytest.approx([0.2, 0.4, 0.4, 0.05])  # 2 warm-up steps
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == pytest.approx(0.05)
    lr = torch.tensor(0.0)
    for g in opt.param_groups:
        g["lr"] = lr
    schedule.set(1)
    assert all(g["lr"] is lr for g in opt.param_groups) and lr.item() == pytest.approx(0.4)


def test_constant_schedule_is_the_original():
    f = lr_factor(TrainConfig(schedule="constant"), 100)
    assert {f(s) for s in range(100)} == {1.0}


def test_onecycle_rises_then_falls_to_zero():
    f = lr_factor(TrainConfig(schedule="onecycle", warmup=0.2), 100)
    assert f(0) == pytest.approx(1 / 20) and f(19) == pytest.approx(1.0)
    assert f(60) == pytest.approx(1 - 40 / 80) and f(100) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(20, 100))


def test_cosine_warms_up_then_follows_a_half_cosine():
    f = lr_factor(TrainConfig(schedule="cosine", warmup=0.1), 100)  # 10 warm-up steps, then 90 of cosine
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert f(31) == pytest.approx(0.5 * (1 + math.cos(math.pi * 21 / 90)))


def test_no_weight_decay_on_batchnorm_and_biases():
    model = build_model(ModelConfig())
    opt = make_optimizer(model, TrainConfig(weight_decay=5e-4, momentum=0.9, nesterov=True), CPU, "fp32")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    bn = model[0][1]
    assert any(p is bn.weight for p in no_decay["params"]) and any(
        p is model[-1].bias for p in no_decay["params"]
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_ema_follows_the_weights_and_off_is_the_model_itself():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)  # the first update copies, then each moves halfway
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, start + 3.0)
    assert NoEMA(model).module is model and NoEMA(model).state_dict() is None


@pytest.mark.parametrize("precision, fused", [("bf16", True), ("fp32", True), ("fp16", False)])
def test_fused_sgd_on_every_device_except_under_a_grad_scaler(precision, fused):
    """fp16's GradScaler skips overflowing steps, which leaves the fused kernel's momentum uninitialised. On the
    CPU too the fused kernel is the fast one (foreach allocates a copy of every gradient each step)."""
    assert optimizer_impl(precision) == (
        {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": True}
    )
    opt = make_optimizer(torch.nn.Linear(3, 2), TrainConfig(), CPU, precision)
    assert [g["fused"] for g in opt.param_groups] == [fused or None] * 2


def test_the_cpus_fused_sgd_updates_as_foreach_does():
    """The fused kernel the CPU now runs: the same momentum, Nesterov and weight-decay update as foreach, to
    fp32 rounding, over steps that carry momentum."""
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    train = TrainConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    pair = [copy.deepcopy(model), copy.deepcopy(model)]
    fused, foreach = (make_optimizer(m, train, CPU, p) for m, p in zip(pair, ("fp32", "fp16")))
    assert fused.param_groups[0]["fused"] and foreach.param_groups[0]["foreach"]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for m in pair:
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        fused.step()
        foreach.step()
    moved = max((a - b).abs().max().item() for a, b in zip(pair[0].parameters(), model.parameters()))
    for a, b in zip(*(m.parameters() for m in pair)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * moved)


def test_loaded_optimizer_state_keeps_this_devices_kernel():
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model, TrainConfig(momentum=0.9), CPU, "fp32")
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    for g in saved["param_groups"]:  # as an fp16 run saves it
        g.update(fused=None, foreach=True)
    fresh = make_optimizer(model, TrainConfig(momentum=0.9), CPU, "fp32")
    load_optimizer_state(fresh, saved)
    assert [(g["fused"], g["foreach"]) for g in fresh.param_groups] == [(True, None)] * 2
    assert torch.equal(
        fresh.state_dict()["state"][0]["momentum_buffer"], saved["state"][0]["momentum_buffer"]
    )


def test_ema_update_matches_torchs_averaged_model_and_keeps_no_host_state():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = build_model(ModelConfig())
    ours = EMA(model, decay=0.9)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            model(torch.randn(4, 1, 28, 28))  # moves the BatchNorm statistics
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ours.update(model)
        ref.update_parameters(model)
    got, want = ours.module.state_dict(), ref.module.state_dict()
    for k, v in want.items():
        if v.is_floating_point():
            assert torch.allclose(got[k], v, atol=1e-6), k
        else:  # integer batch counters: copied, not averaged
            assert torch.equal(got[k], model.state_dict()[k]), k
    assert ours.count == 3 and isinstance(ours.state_dict()["n_averaged"], int)
    # checkpoints written with torch's AveragedModel (n_averaged a tensor) still load
    again = EMA(model, decay=0.9)
    again.load_state_dict({"weights": ref.module.state_dict(), "n_averaged": ref.n_averaged})
    assert again.count == 3


def test_cudnn_benchmark_on_gpus():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        device.configure_backends(CPU)
        assert torch.backends.cudnn.benchmark is False
        device.configure_backends(torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
