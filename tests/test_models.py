"""d2lite.lenet and d2lite.mnist_net: the chapter's networks and the blog's, built from options."""
import pytest
import torch
from torch import nn

from d2lite import BatchNorm, count_parameters, lenet, mnist_net


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


def _norms(net):
    return [name for name, m in net.named_children()
            if isinstance(m, (BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d))]


def test_mnist_net_is_pytorchs_example_network_returning_log_probabilities():
    net = mnist_net()
    assert [n for n, _ in net.named_children()] == [
        "conv1", "pool1", "act1", "conv2", "pool2", "act2", "flatten", "fc1", "act3", "fc2",
        "log_softmax"]
    assert _kinds(net) == [nn.Conv2d, nn.MaxPool2d, nn.ReLU, nn.Conv2d, nn.MaxPool2d, nn.ReLU,
                           nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.LogSoftmax]
    # conv1 1*10*25+10, conv2 10*20*25+20, fc1 320*50+50, fc2 50*10+10
    assert [count_parameters(getattr(net, n)) for n in ("conv1", "conv2", "fc1", "fc2")] == [
        260, 5020, 16050, 510]
    assert count_parameters(net) == 21840
    out = net(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))  # rows are log-probabilities


def test_mnist_net_log_softmax_output_gives_cross_entropy_the_loss_of_its_logits():
    """d2lite.train's nn.CrossEntropyLoss applies log_softmax again: a no-op on log-probabilities."""
    torch.manual_seed(0)
    net = mnist_net().double()
    x, y = torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,))
    log_probs = net(x)
    logits = net[:-1](x)
    ce = nn.CrossEntropyLoss()
    torch.testing.assert_close(ce(log_probs, y), ce(logits, y), rtol=0, atol=1e-12)
    torch.testing.assert_close(ce(log_probs, y), nn.NLLLoss()(log_probs, y), rtol=0, atol=1e-12)


def test_mnist_net_batch_norm_only_where_asked():
    blog = mnist_net(norm="torch")
    assert _norms(blog) == ["bn2", "bn3"]  # conv2 and fc1 (dense1), the blog's
    assert isinstance(blog.bn2, nn.BatchNorm2d) and blog.bn2.num_features == 20
    assert isinstance(blog.bn3, nn.BatchNorm1d) and blog.bn3.num_features == 50
    names = [n for n, _ in blog.named_children()]
    assert names.index("bn2") == names.index("conv2") + 1 and names.index("bn3") == names.index("fc1") + 1
    assert count_parameters(blog) == 21840 + 2 * (20 + 50)
    everywhere = mnist_net(norm="d2lite", norm_layers="all")
    assert _norms(everywhere) == ["bn1", "bn2", "bn3"]
    assert all(isinstance(getattr(everywhere, n), BatchNorm) for n in ("bn1", "bn2", "bn3"))
    assert count_parameters(everywhere) == 21840 + 2 * (10 + 20 + 50)
    assert _norms(mnist_net(norm="d2lite", norm_layers=("conv1",))) == ["bn1"]
    assert _norms(mnist_net(norm="torch", norm_layers="fc1")) == ["bn3"]
    assert _norms(mnist_net(norm_layers="all")) == []  # norm=None: no batch norm anywhere
    for net in (blog, everywhere):
        assert net(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_mnist_net_torch_and_d2lite_norms_agree_with_the_same_weights():
    torch.manual_seed(0)
    reference = mnist_net(norm="torch", norm_layers="all").double()
    ours = mnist_net(norm="d2lite", norm_layers="all").double()
    ours.load_state_dict(reference.state_dict())  # d2lite.BatchNorm loads nn.BatchNorm's state
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    # float64: the two normalize in a different order of operations, equal to ~1e-15
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-10, atol=1e-10)  # training mode
    ours.eval()
    reference.eval()
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-10, atol=1e-10)  # running statistics


def test_mnist_net_dropout_where_pytorchs_example_has_it():
    net = mnist_net(norm="torch", dropout=0.5)
    names = [n for n, _ in net.named_children()]
    assert isinstance(net.drop2, nn.Dropout2d) and names.index("drop2") == names.index("bn2") + 1
    assert isinstance(net.drop3, nn.Dropout) and names.index("drop3") == names.index("act3") + 1
    assert net.drop2.p == net.drop3.p == 0.5
    assert not any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in mnist_net())


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="batch"), "norm must be one of"),
    (dict(norm="torch", norm_layers=("conv2", "fc2")), r"may name only .*unknown \['fc2'\]"),
    (dict(norm="torch", norm_layers="dense1"), r"unknown \['dense1'\]"),
    (dict(dropout=-0.1), "dropout must be in"),
    (dict(num_classes=0), "num_classes must be a positive int"),
])
def test_mnist_net_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mnist_net(**kwargs)
