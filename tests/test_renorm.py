"""d2lite.renorm: batch renormalization against batch norm (its two limits) and its own formula."""
import pytest
import torch
import torch.nn.functional as F

import d2lite
from d2lite.renorm import BatchRenorm, batch_renorm

TOL = dict(rtol=1e-10, atol=1e-10)


def _inputs(shape=(8, 3, 4, 4)):
    torch.manual_seed(0)
    X = torch.randn(shape, dtype=torch.float64) * 2 + 1
    gamma = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(3, dtype=torch.float64).requires_grad_()
    mean, var = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    return X, gamma, beta, mean, var


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5), (8, 3, 4, 4)])
def test_no_room_to_correct_is_batch_norm(shape):
    X, gamma, beta, mean, var = _inputs(shape)
    Xa, Xb = X.clone().requires_grad_(), X.clone().requires_grad_()
    Y, new_mean, new_var = batch_renorm(Xa, gamma, beta, mean, var, r_max=1.0, d_max=0.0)
    m, v = mean.clone(), var.clone()
    expected = F.batch_norm(Xb, m, v, gamma, beta, training=True)
    torch.testing.assert_close(Y, expected, **TOL)
    torch.testing.assert_close(new_mean, m, **TOL)
    torch.testing.assert_close(new_var, v, **TOL)
    W = torch.randn_like(X)
    ga = torch.autograd.grad((Y * W).sum(), (Xa, gamma, beta))
    gb = torch.autograd.grad((expected * W).sum(), (Xb, gamma, beta))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **TOL)


def test_no_clipping_outputs_inference_batch_norm_with_constant_r_and_d():
    X, gamma, beta, mean, var = _inputs()
    X = X.requires_grad_()
    Y, _, _ = batch_renorm(X, gamma, beta, mean, var, r_max=1e9, d_max=1e9)
    torch.testing.assert_close(Y, F.batch_norm(X, mean, var, gamma, beta, training=False), **TOL)
    # the gradient treats r and d as constants: the formula written out with them detached
    dims, shape = [0, 2, 3], (1, 3, 1, 1)
    mu, sb = X.mean(dims), (X.var(dims, correction=0) + 1e-5).sqrt()
    s = (var + 1e-5).sqrt()
    r, d = (sb / s).detach(), ((mu - mean) / s).detach()
    manual = gamma.view(shape) * ((X - mu.view(shape)) / sb.view(shape) * r.view(shape) + d.view(shape)) + beta.view(shape)
    W = torch.randn_like(Y)
    torch.testing.assert_close(torch.autograd.grad((Y * W).sum(), X)[0],
                               torch.autograd.grad((manual * W).sum(), X)[0], **TOL)


def test_module_warm_up_schedule_and_eval_mode():
    layer = BatchRenorm(3, warmup_steps=2, ramp_steps=4).double()
    limits = []
    for _ in range(8):
        limits.append(layer.limits())
        layer(torch.randn(6, 3, dtype=torch.float64))
    assert limits[:2] == [(1.0, 0.0), (1.0, 0.0)]
    assert limits[2] == (1.0, 0.0) and limits[3] == pytest.approx((1.5, 1.25))
    assert limits[6] == limits[7] == (3.0, 5.0)
    assert int(layer.num_batches_tracked) == 8
    layer.eval()
    X = torch.randn(4, 3, dtype=torch.float64)
    expected = F.batch_norm(X, layer.moving_mean, layer.moving_var, layer.gamma, layer.beta, training=False)
    torch.testing.assert_close(layer(X), expected, **TOL)


def test_module_in_warm_up_trains_as_batch_norm():
    torch.manual_seed(0)
    renorm, bn = BatchRenorm(3, warmup_steps=100).double(), d2lite.BatchNorm(3).double()
    for _ in range(3):
        X = torch.randn(5, 3, 2, 2, dtype=torch.float64)
        torch.testing.assert_close(renorm(X), bn(X), **TOL)
    torch.testing.assert_close(renorm.moving_var, bn.moving_var, **TOL)


@pytest.mark.parametrize("kwargs,message", [(dict(r_max=0.5), "r_max must be >= 1"),
                                            (dict(d_max=-1), "d_max >= 0"),
                                            (dict(warmup_steps=-1), "warmup_steps")])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchRenorm(3, **kwargs)
