"""d2lite.lenet: the chapter's networks, built from options."""
import pytest
import torch
from torch import nn

from d2lite import BatchNorm, count_parameters, lenet


def _kinds(net):
    """The torch.nn class (or d2lite.BatchNorm) of each layer; d2lite.layers subclasses count as
    the torch layer they speed up."""
    return [type(m) if type(m).__module__.startswith("torch") or isinstance(m, BatchNorm)
            else next(k for k in type(m).__mro__ if k.__module__.startswith("torch.nn"))
            for m in net]


def test_d2l_lenet_bn_is_the_books_network():
    net = lenet(norm="d2lite")
    assert _kinds(net) == [nn.Conv2d, BatchNorm, nn.Sigmoid, nn.AvgPool2d,
                           nn.Conv2d, BatchNorm, nn.Sigmoid, nn.AvgPool2d, nn.Flatten,
                           nn.Linear, BatchNorm, nn.Sigmoid, nn.Linear, BatchNorm, nn.Sigmoid,
                           nn.Linear]
    assert isinstance(net[1], BatchNorm) and net[1].gamma.shape == (6,)  # the book's net[1].gamma
    assert net.fc1.in_features == 16 * 4 * 4
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_plain_lenet_has_no_norm_and_the_same_layers_otherwise():
    plain, bn = lenet(), lenet(norm="d2lite")
    assert not any(isinstance(m, (BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d)) for m in plain.modules())
    assert count_parameters(bn) - count_parameters(plain) == 2 * (6 + 16 + 120 + 84)


def test_torch_norm_uses_2d_after_conv_and_1d_after_linear():
    net = lenet(norm="torch")
    assert isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.bn2, nn.BatchNorm2d)
    assert isinstance(net.bn3, nn.BatchNorm1d) and isinstance(net.bn4, nn.BatchNorm1d)


def test_bias_false_drops_only_biases_before_batch_norm():
    net = lenet(norm="d2lite", norm_layers=("conv1", "fc1"), bias=False)
    assert net.conv1.bias is None and net.fc1.bias is None
    assert net.conv2.bias is not None and net.fc2.bias is not None and net.fc3.bias is not None
    full = lenet(norm="d2lite", norm_layers=("conv1", "fc1"))
    assert count_parameters(full) - count_parameters(net) == 6 + 120


def test_norm_per_layer_and_position_after_activation():
    net = lenet(norm="d2lite", norm_layers=("conv2",), norm_position="after")
    names = [n for n, _ in net.named_children()]
    assert [n for n in names if n.startswith("bn")] == ["bn2"]
    assert names.index("act2") + 1 == names.index("bn2")


def test_dropout_variant():
    net = lenet(dropout=0.5)
    drops = [m for m in net if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    names = [n for n, _ in net.named_children()]
    assert names.index("drop3") == names.index("act3") + 1


def test_deeplizard_and_lenet5_variants():
    dl = lenet("deeplizard", norm="torch")
    assert isinstance(dl.act1, nn.ReLU) and isinstance(dl.pool1, nn.MaxPool2d)
    assert dl.conv2.out_channels == 12 and dl.fc2.out_features == 60
    assert dl(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    l5 = lenet("lenet5")
    assert l5.fc1.in_features == 16 * 5 * 5
    assert l5(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    with pytest.raises(RuntimeError):
        l5(torch.randn(3, 1, 28, 28))  # LeNet-5 wants resize=32


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="alexnet"), "variant must be one of"),
    (dict(norm="layer"), "norm must be one of"),
    (dict(norm="d2lite", norm_layers=("conv3",)), "unknown"),
    (dict(norm_position="middle"), "norm_position must be one of"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(activation="gelu"), "activation must be one of"),
    (dict(input_size=12), "too small"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lenet(**kwargs)


def test_bias_false_keeps_biases_when_norm_comes_after_the_activation():
    net = lenet(norm="d2lite", norm_position="after", bias=False)
    assert all(getattr(net, n).bias is not None for n in ("conv1", "conv2", "fc1", "fc2", "fc3"))
