import pytest
import torch

from resnet_dist.config import ModelConfig
from resnet_dist.model import Residual, build_model, memory_format, resnet_block

# 11,178,378 = the original ResNet-18 (biased convs, as first written) for 1 input channel and 10 classes
PARAMS = {"imagenet": 11_178_378, "cifar": 11_175_818}


@pytest.mark.parametrize("stem, size", [("imagenet", 224), ("imagenet", 28), ("cifar", 28)])
def test_output_shape(stem, size):
    net = build_model(ModelConfig(stem=stem)).eval()
    assert net(torch.randn(3, 1, size, size)).shape == (3, 10)


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_parameter_count(stem):
    net = build_model(ModelConfig(stem=stem))
    assert sum(p.numel() for p in net.parameters()) == PARAMS[stem]


def test_parameter_count_from_the_architecture():
    def conv(i, o, k):
        return i * o * k * k + o

    bn = lambda c: 2 * c  # noqa: E731

    def residual(i, o, proj):
        return conv(i, o, 3) + conv(o, o, 3) + 2 * bn(o) + (conv(i, o, 1) if proj else 0)

    stages = 2 * residual(64, 64, False)
    for i, o in ((64, 128), (128, 256), (256, 512)):
        stages += residual(i, o, True) + residual(o, o, False)
    assert PARAMS["imagenet"] == conv(1, 64, 7) + bn(64) + stages + 512 * 10 + 10
    assert PARAMS["cifar"] == conv(1, 64, 3) + bn(64) + stages + 512 * 10 + 10


def test_residual_projection_and_stride():
    assert Residual(3, 3)(torch.randn(2, 3, 6, 6)).shape == (2, 3, 6, 6)
    assert Residual(3, 6, use_1x1conv=True, strides=2)(torch.randn(2, 3, 6, 6)).shape == (2, 6, 3, 3)
    blk = resnet_block(64, 128, 2)
    assert blk[0].conv3 is not None and blk[1].conv3 is None
    assert resnet_block(64, 64, 2, first_block=True)[0].conv3 is None


def test_init_kinds_differ_and_are_seeded():
    torch.manual_seed(0)
    a = build_model(ModelConfig(init="xavier"))
    torch.manual_seed(0)
    b = build_model(ModelConfig(init="xavier"))
    torch.manual_seed(0)
    c = build_model(ModelConfig(init="kaiming"))
    w = lambda m: m[0][0].weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))


def test_channels_last_only_on_gpus():
    assert memory_format(torch.device("cuda")) == torch.channels_last
    assert memory_format(torch.device("cpu")) == torch.contiguous_format
