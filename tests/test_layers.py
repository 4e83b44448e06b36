"""d2lite.layers: Conv2d and AvgPool2d give nn.Conv2d's and nn.AvgPool2d's numbers, fast path or not.

AvgPool2d's fast path adds in ATen's order, so forward and backward are compared to the bit.
Conv2d's forward is F.conv2d itself (to the bit); its fast backward runs another oneDNN kernel,
so gradients are compared with the float32 tolerance of tests/helpers.py.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2lite.layers import AvgPool2d, Conv2d
from helpers import assert_matches


def _pair_of_convs(*args, **kwargs):
    torch.manual_seed(0)
    ours = Conv2d(*args, **kwargs)
    reference = nn.Conv2d(*args, **kwargs)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def _grads(conv, x, g):
    y = conv(x)
    wanted = [t for t in (x, conv.weight, conv.bias) if t is not None and t.requires_grad]
    return y, y.grad_fn.name(), torch.autograd.grad(y, wanted, g)


@pytest.mark.parametrize("options", [dict(), dict(bias=False), dict(stride=2), dict(padding=2),
                                     dict(dilation=2), dict(stride=(1, 2), padding=(0, 1))])
@pytest.mark.parametrize("input_grad", [False, True])
def test_single_channel_conv_takes_the_fast_path_and_matches_nn_conv2d(options, input_grad):
    ours, reference = _pair_of_convs(1, 6, 5, **options)
    x = torch.randn(64, 1, 28, 28, requires_grad=input_grad)
    y = ours(x)
    assert y.grad_fn.name() == "_SingleChannelConv2dBackward"
    g = torch.randn_like(y)
    y_ref, _, want = _grads(reference, x, g)
    _, _, got = _grads(ours, x, g)
    assert torch.equal(y, y_ref)
    assert len(got) == len(want) == 1 + input_grad + ("bias" not in options)
    for a, b in zip(got, want):
        assert_matches(a, b, torch.float32)


@pytest.mark.parametrize("case", ["float64", "three channels", "no grad", "channels-last",
                                  "reflect padding", "oneDNN disabled"])
def test_conv_falls_back_to_nn_conv2d_elsewhere(case, monkeypatch):
    channels, dtype, options = 1, torch.float32, {}
    if case == "three channels":
        channels = 3
    elif case == "float64":
        dtype = torch.float64
    elif case == "reflect padding":
        options = dict(padding=2, padding_mode="reflect")
    elif case == "channels-last":
        channels = 3
    ours, reference = _pair_of_convs(channels, 4, 3, **options)
    ours, reference = ours.to(dtype), reference.to(dtype)
    x = torch.randn(8, channels, 10, 10, dtype=dtype)
    if case == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    if case == "no grad":
        with torch.no_grad():
            assert torch.equal(ours(x), reference(x))
        return
    if case == "oneDNN disabled":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    y, node, got = _grads(ours, x, torch.ones(8, 4, *reference(x).shape[2:], dtype=dtype))
    _, _, want = _grads(reference, x, torch.ones_like(y))
    assert node != "_SingleChannelConv2dBackward"
    assert torch.equal(y, reference(x))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_conv_is_an_nn_conv2d_with_the_same_state_dict_and_repr():
    ours, reference = _pair_of_convs(1, 6, 5)
    assert isinstance(ours, nn.Conv2d)
    assert repr(ours) == repr(reference)
    assert ours.state_dict().keys() == reference.state_dict().keys()


def test_conv_fast_path_gradcheck_in_float64_through_the_same_function():
    """The fast path's autograd.Function, forced in float64, is the exact gradient."""
    from d2lite.layers import _SingleChannelConv2d
    torch.manual_seed(0)
    x = torch.randn(3, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: _SingleChannelConv2d.apply(x, w, b, (1, 1), (1, 1), (1, 1)), (x, w, b))


@pytest.mark.parametrize("shape,kernel", [((256, 6, 24, 24), 2), ((256, 16, 8, 8), 2),
                                          ((4, 3, 7, 9), 2), ((4, 3, 7, 9), 3),
                                          ((4, 3, 7, 9), (2, 3)), ((2, 2, 6, 6), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_avg_pool_fast_path_is_atens_to_the_bit(shape, kernel, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = AvgPool2d(kernel)(x)
    y_ref = F.avg_pool2d(x, kernel)
    assert y.grad_fn.name() == "_WindowMeanBackward"
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


@pytest.mark.parametrize("options", [dict(kernel_size=3, stride=2), dict(kernel_size=2, padding=1),
                                     dict(kernel_size=3, ceil_mode=True),
                                     dict(kernel_size=2, divisor_override=3)])
def test_avg_pool_falls_back_to_aten_for_other_windows(options):
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    y = AvgPool2d(**options)(x)
    assert y.grad_fn.name() == "AvgPool2DBackward0"
    assert torch.equal(y, nn.AvgPool2d(**options)(x))


def test_avg_pool_falls_back_for_channels_last_and_3d_input():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert torch.equal(AvgPool2d(2)(x), F.avg_pool2d(x, 2))
    x3 = torch.randn(3, 8, 8, requires_grad=True)  # unbatched (C, H, W)
    assert torch.equal(AvgPool2d(2)(x3), F.avg_pool2d(x3, 2))


def test_avg_pool_is_an_nn_avg_pool2d():
    assert isinstance(AvgPool2d(2), nn.AvgPool2d)
    assert repr(AvgPool2d(2, 2)) == repr(nn.AvgPool2d(2, 2))
