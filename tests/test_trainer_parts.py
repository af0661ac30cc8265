"""The trainer's small parts, each alone: precision choice, LR schedules, optimizer groups, EMA."""
import math

import pytest
import torch

from resnet_dist.config import ModelConfig, TrainConfig
from resnet_dist.model import build_model
from resnet_dist.trainer import EMA, NoEMA, lr_factor, make_optimizer, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("requested, env, want", [
    ("auto", {}, "fp32"),
    ("auto", {"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16"),
    ("auto", {"ACCELERATE_MIXED_PRECISION": "fp16"}, "fp16"),
    ("auto", {"ACCELERATE_MIXED_PRECISION": "no"}, "fp32"),
    ("bf16", {"ACCELERATE_MIXED_PRECISION": "fp16"}, "bf16"),  # an explicit choice wins
    ("fp32", {}, "fp32"),
])
def test_resolve_precision_on_cpu(requested, env, want):
    assert resolve_precision(requested, CPU, env) == want


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
    opt = make_optimizer(model, TrainConfig(weight_decay=5e-4, momentum=0.9, nesterov=True), CPU)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    bn = model[0][1]
    assert any(p is bn.weight for p in no_decay["params"]) and any(p is model[-1].bias for p in no_decay["params"])
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


def test_predict_normalizes_and_averages_the_mirror_with_flip_tta():
    from resnet_dist.data import normalize
    from resnet_dist.trainer import predict
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    x = normalize(images, None)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
    assert torch.allclose(predict(model, images, None), plain)
    assert torch.allclose(predict(model, images, None, tta_flip=True), (plain + mirrored) / 2)
