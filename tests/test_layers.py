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


def test_second_derivatives_through_both_fast_paths_match_the_torch_layers():
    """A gradient penalty (create_graph=True) gives the torch layers' weight gradients."""
    torch.manual_seed(0)
    ours, reference = _pair_of_convs(1, 4, 3)
    x = torch.randn(4, 1, 8, 8)
    grads = []
    for conv, pool in ((ours, AvgPool2d(2)), (reference, nn.AvgPool2d(2))):
        xx = x.clone().requires_grad_()
        out = torch.sigmoid(pool(conv(xx))).square().sum()
        assert conv(xx).grad_fn.name() == ("_SingleChannelConv2dBackward" if conv is ours
                                           else "ConvolutionBackward0")
        g, = torch.autograd.grad(out, xx, create_graph=True)
        conv.zero_grad()
        (out + g.square().sum()).backward()
        grads.append((conv.weight.grad.clone(), conv.bias.grad.clone()))
    for a, b in zip(*grads):
        assert_matches(a, b, torch.float32)


def test_both_functions_pass_gradcheck_and_gradgradcheck_in_float64():
    """The fast paths' autograd.Functions, forced in float64, give exact first and second
    derivatives."""
    from d2lite.layers import _SingleChannelConv2d
    torch.manual_seed(0)
    x = torch.randn(3, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    for padding in ((0, 0), (1, 1)):
        def conv(x, w, b):
            return _SingleChannelConv2d.apply(x, w, b, (1, 1), padding, (1, 1))
        assert torch.autograd.gradcheck(conv, (x, w, b))
        assert torch.autograd.gradgradcheck(conv, (x, w, b))
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    assert AvgPool2d(2)(x).grad_fn.name() == "_WindowMeanBackward"
    assert torch.autograd.gradcheck(AvgPool2d(2), (x,))
    assert torch.autograd.gradgradcheck(AvgPool2d(2), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_avg_pool_leaves_half_precision_to_aten(dtype):
    """ATen adds half-precision windows in float32 and rounds once: the fast path would not."""
    x = torch.randn(8, 6, 24, 24).to(dtype).requires_grad_()
    y = AvgPool2d(2)(x)
    assert y.grad_fn.name() == "AvgPool2DBackward0"
    assert torch.equal(y, F.avg_pool2d(x, 2))


def test_lenet_layers_train_under_cpu_autocast_like_the_torch_layers():
    torch.manual_seed(0)
    ours, reference = _pair_of_convs(1, 6, 5)
    x = torch.randn(16, 1, 28, 28)
    results = []
    for conv, pool in ((ours, AvgPool2d(2)), (reference, nn.AvgPool2d(2))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = pool(conv(x))
        y.float().sum().backward()
        results.append((y, conv.weight.grad))
    assert results[0][0].dtype == torch.bfloat16
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.func scripts a helper on first use
def test_functorch_transforms_and_forward_ad_work_as_with_the_torch_layers():
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    ours, reference = _pair_of_convs(1, 3, 3)
    x, t = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)

    def per_example_grads(conv, pool):
        params = {k: v.detach() for k, v in conv.named_parameters()}

        def loss(p, xi):
            return pool(functional_call(conv, p, (xi.unsqueeze(0),))).square().sum()
        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    got = per_example_grads(ours, AvgPool2d(2))
    want = per_example_grads(reference, nn.AvgPool2d(2))
    for k in want:
        assert torch.equal(got[k], want[k])
    with fwAD.dual_level():
        tangents = [fwAD.unpack_dual(pool(fwAD.make_dual(x, t))).tangent
                    for pool in (AvgPool2d(2), nn.AvgPool2d(2))]
    assert torch.equal(*tangents)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated in 2.14
def test_script_and_trace_fall_back_to_the_torch_layers():
    ours, reference = _pair_of_convs(1, 6, 5)
    x = torch.randn(4, 1, 28, 28)
    for layer, torch_layer in ((ours, reference), (AvgPool2d(2), nn.AvgPool2d(2))):
        scripted = torch.jit.script(layer)
        traced = torch.jit.trace(layer, (x if layer is ours else torch.randn(4, 6, 24, 24),))
        inp = x if layer is ours else torch.randn(4, 6, 24, 24)
        assert torch.equal(scripted(inp), torch_layer(inp))
        assert torch.equal(traced(inp), torch_layer(inp))


def test_avg_pool_kernel_sizes_as_torch_takes_them():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(AvgPool2d((2,))(x), nn.AvgPool2d((2,))(x))
    with pytest.raises(RuntimeError):
        AvgPool2d(0)(x)


def test_single_channel_channels_last_input_takes_the_fast_path():
    """(N, 1, H, W) stored channels-last is the same memory as contiguous: same numbers."""
    ours, reference = _pair_of_convs(1, 6, 5)
    x = torch.randn(8, 1, 12, 12)
    x_cl = x.as_strided(x.shape, (144, 1, 12, 1)).requires_grad_()
    y = ours(x_cl)
    assert y.grad_fn.name() == "_SingleChannelConv2dBackward"
    g = torch.randn_like(y)
    _, _, got = _grads(ours, x_cl, g)
    _, _, want = _grads(reference, x.clone().requires_grad_(), g)
    for a, b in zip(got, want):
        assert_matches(a, b, torch.float32)
