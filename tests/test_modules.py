"""d2lite.BatchNorm against nn.BatchNorm1d/2d/3d: several training steps, then eval.

Tolerances: see tests/helpers.py.
"""
import copy
import io

import pytest
import torch
from torch import nn

from d2lite import BatchNorm, convert_batchnorm
from helpers import TOL, assert_matches

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = [(16, 4), (8, 4, 6), (6, 4, 5, 3), (3, 4, 3, 2, 4)]
OPTIONS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
           dict(eps=1e-2, momentum=0.5), dict(momentum=None, affine=False)]


def _pair(shape, dtype, **kwargs):
    ref = TORCH_BN[len(shape)](shape[1], dtype=dtype, **kwargs)
    ours = BatchNorm(shape[1], dtype=dtype, **kwargs)
    if ref.affine:  # start away from 1 and 0 so that gamma and beta matter
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _assert_same_state(ours, ref, dtype):
    if ref.affine:
        assert_matches(ours.gamma, ref.weight, dtype)
        assert_matches(ours.beta, ref.bias, dtype)
    if ref.track_running_stats:
        assert_matches(ours.moving_mean, ref.running_mean, dtype)
        assert_matches(ours.moving_var, ref.running_var, dtype)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_training_steps_then_eval_match_torch(shape, dtype, options):
    torch.manual_seed(0)
    ours, ref = _pair(shape, dtype, **options)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1) if ours.affine else None
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1) if ref.affine else None
    for step in range(4):
        X = torch.randn(shape, dtype=dtype) * (step + 1) + step
        target = torch.randn(shape, dtype=dtype)
        Xo, Xr = X.clone().requires_grad_(), X.clone().requires_grad_()
        Yo, Yr = ours(Xo), ref(Xr)
        assert_matches(Yo, Yr, dtype)
        ((Yo - target) ** 2).mean().backward()
        ((Yr - target) ** 2).mean().backward()
        assert_matches(Xo.grad, Xr.grad, dtype)
        if opt_ref:
            assert_matches(ours.gamma.grad, ref.weight.grad, dtype)
            assert_matches(ours.beta.grad, ref.bias.grad, dtype)
            opt_ours.step(), opt_ref.step()
            opt_ours.zero_grad(), opt_ref.zero_grad()
        _assert_same_state(ours, ref, dtype)
    ours.eval(), ref.eval()
    X = torch.randn(shape, dtype=dtype)
    assert_matches(ours(X), ref(X), dtype)
    _assert_same_state(ours, ref, dtype)


def test_mode_follows_module_training_not_grad_mode():
    bn = BatchNorm(3)
    X = torch.randn(10, 3) * 4 + 7
    with torch.no_grad():  # d2l would switch to moving statistics here; PyTorch does not
        Y = bn(X)
    assert bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(Y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    bn.eval()
    Y = bn(X)  # eval with grad enabled still uses the moving statistics
    assert bn.num_batches_tracked.item() == 1
    expected = (X - bn.moving_mean) / (bn.moving_var + bn.eps).sqrt()
    torch.testing.assert_close(Y, expected)


def test_buffers_and_parameters_are_registered():
    bn = BatchNorm(5)
    assert [n for n, _ in bn.named_parameters()] == ["gamma", "beta"]
    assert [n for n, _ in bn.named_buffers()] == ["moving_mean", "moving_var", "num_batches_tracked"]
    assert set(bn.state_dict()) == {"gamma", "beta", "moving_mean", "moving_var", "num_batches_tracked"}
    bn(torch.randn(8, 5))
    double = copy.deepcopy(bn).double()
    assert double.moving_mean.dtype == torch.float64 and double.gamma.dtype == torch.float64
    torch.testing.assert_close(double.moving_var.float(), bn.moving_var)
    buffer = io.BytesIO()
    torch.save(bn.state_dict(), buffer)
    buffer.seek(0)
    fresh = BatchNorm(5)
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh.moving_mean, bn.moving_mean, rtol=0, atol=0)


def test_statistics_keep_no_graph_across_steps():
    bn = BatchNorm(4)
    X = torch.randn(8, 4, requires_grad=True)
    for _ in range(3):
        bn(X * 2).sum().backward()
    assert bn.moving_mean.grad_fn is None and bn.moving_var.grad_fn is None


@pytest.mark.parametrize("shape", SHAPES)
def test_loads_torch_state_dict_and_exports_one(shape):
    torch.manual_seed(1)
    ref = TORCH_BN[len(shape)](shape[1])
    ref(torch.randn(shape) * 3 + 1)  # non-trivial running statistics
    with torch.no_grad():
        ref.weight.uniform_(), ref.bias.uniform_()
    ours = BatchNorm(shape[1])
    ours.load_state_dict(ref.state_dict())  # weight→gamma, running_mean→moving_mean, …
    ours.eval(), ref.eval()
    X = torch.randn(shape)
    assert_matches(ours(X), ref(X), torch.float32)
    back = TORCH_BN[len(shape)](shape[1])
    back.load_state_dict(ours.torch_state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    exported = ours.to_torch(TORCH_BN[len(shape)]).eval()
    torch.testing.assert_close(exported(X), ref(X), rtol=0, atol=0)  # PyTorch on both sides


def test_convert_batchnorm_swaps_every_layer_and_keeps_outputs():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                        nn.Sequential(nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5)))
    net(torch.randn(6, 1, 6, 6))
    net.eval()
    X = torch.randn(4, 1, 6, 6)
    expected = net(X)
    converted = convert_batchnorm(copy.deepcopy(net))
    kinds = [type(m) for m in converted.modules()]
    assert nn.BatchNorm2d not in kinds and nn.BatchNorm1d not in kinds
    assert kinds.count(BatchNorm) == 2
    assert_matches(converted(X), expected, torch.float32)
    # and a whole-model state_dict with PyTorch's names loads into the converted model
    converted.load_state_dict(net.state_dict())


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_features=0), "num_features must be a positive int"),
    (dict(num_features=2.0), "num_features must be a positive int"),
    (dict(num_features=3, eps=0), "eps must be > 0"),
    (dict(num_features=3, momentum=2.0), "momentum must be in"),
])
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchNorm(**kwargs)


def test_wrong_channel_count_is_named():
    with pytest.raises(ValueError, match=r"BatchNorm\(4\) got X of shape \(8, 3\): expected 4 channels"):
        BatchNorm(4)(torch.randn(8, 3))


def test_repr_mentions_settings():
    assert repr(BatchNorm(6, momentum=None)) == (
        "BatchNorm(6, eps=1e-05, momentum=None, affine=True, track_running_stats=True)")
