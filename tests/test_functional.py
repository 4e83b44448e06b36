"""d2lite.batch_norm against torch.nn.functional.batch_norm.

Tolerances: see tests/helpers.py.
"""
import pytest
import torch
import torch.nn.functional as F

from d2lite import batch_norm
from helpers import TOL, assert_matches

SHAPES = [(16, 5), (8, 5, 7), (8, 5, 6, 4), (4, 5, 3, 4, 2)]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    X = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 2).requires_grad_()
    gamma = torch.randn(C, generator=g, dtype=dtype).requires_grad_()
    beta = torch.randn(C, generator=g, dtype=dtype).requires_grad_()
    mm = torch.randn(C, generator=g, dtype=dtype)
    mv = torch.rand(C, generator=g, dtype=dtype) + 0.5
    return X, gamma, beta, mm, mv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_outputs_statistics_and_gradients(shape, dtype, training):
    X, gamma, beta, mm, mv = _inputs(shape, dtype)
    Y, new_mm, new_mv = batch_norm(X, gamma, beta, mm, mv, eps=1e-3, momentum=0.3, training=training)
    ref_mm, ref_mv = mm.clone(), mv.clone()
    ref = F.batch_norm(X, ref_mm, ref_mv, gamma, beta, training=training, momentum=0.3, eps=1e-3)
    assert_matches(Y, ref, dtype)
    assert_matches(new_mm, ref_mm, dtype)
    assert_matches(new_mv, ref_mv, dtype)
    dY = torch.randn_like(Y)
    grads = torch.autograd.grad(Y, (X, gamma, beta), dY)
    ref_grads = torch.autograd.grad(ref, (X, gamma, beta), dY)
    for name, got, want in zip(("X", "gamma", "beta"), grads, ref_grads):
        assert_matches(got, want, dtype, msg=lambda m: f"d{name}: {m}")


def test_running_statistics_follow_pytorch_convention_exactly():
    X = torch.tensor([[1.0], [2.0], [6.0]], dtype=torch.float64)
    _, mm, mv = batch_norm(X, None, None, torch.zeros(1, dtype=torch.float64),
                           torch.ones(1, dtype=torch.float64), momentum=0.1)
    # mean 3, unbiased variance ((4 + 1 + 9) / 2) = 7; new = 0.9 * old + 0.1 * batch
    assert mm.item() == pytest.approx(0.3, abs=1e-15)
    assert mv.item() == pytest.approx(0.9 + 0.7, abs=1e-15)


def test_normalizes_with_biased_batch_variance():
    X = torch.tensor([[1.0], [2.0], [6.0]], dtype=torch.float64)
    Y, _, _ = batch_norm(X, None, None, None, None, eps=1e-12)
    biased = torch.tensor(14 / 3, dtype=torch.float64)
    torch.testing.assert_close(Y, (X - 3) / biased.sqrt(), rtol=1e-9, atol=1e-9)


def test_eval_uses_moving_statistics_and_returns_them_unchanged():
    X, gamma, beta, mm, mv = _inputs((6, 3, 4), torch.float64)
    Y, out_mm, out_mv = batch_norm(X, gamma, beta, mm, mv, training=False)
    expected = (gamma.view(1, 3, 1) * (X - mm.view(1, 3, 1)) / (mv.view(1, 3, 1) + 1e-5).sqrt()
                + beta.view(1, 3, 1))
    torch.testing.assert_close(Y, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(out_mm, mm) and torch.equal(out_mv, mv)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_float64(shape):
    small = (shape[0] if len(shape) == 2 else 3,) + tuple(min(s, 3) for s in shape[1:])
    X, gamma, beta, mm, mv = _inputs(small, torch.float64)
    assert torch.autograd.gradcheck(
        lambda X, g, b: batch_norm(X, g, b, mm, mv, momentum=0.1)[0], (X, gamma, beta))
    assert torch.autograd.gradcheck(
        lambda X, g, b: batch_norm(X, g, b, mm, mv, training=False)[0], (X, gamma, beta))


def test_statistics_carry_no_graph_and_inputs_are_untouched():
    X, gamma, beta, mm, mv = _inputs((8, 4), torch.float64)
    mm.requires_grad_()  # even a moving statistic that requires grad must not build a graph
    before = (mm.detach().clone(), mv.clone(), X.detach().clone())
    _, new_mm, new_mv = batch_norm(X, gamma, beta, mm, mv)
    assert new_mm.grad_fn is None and not new_mm.requires_grad
    assert new_mv.grad_fn is None and not new_mv.requires_grad
    assert new_mm is not mm and new_mv is not mv
    assert torch.equal(mm.detach(), before[0]) and torch.equal(mv, before[1])
    assert torch.equal(X.detach(), before[2])


def test_affine_none_and_no_tracking_match_torch():
    X = torch.randn(10, 3, 5, dtype=torch.float64, requires_grad=True)
    Y, mm, mv = batch_norm(X, None, None, None, None)
    assert mm is None and mv is None
    ref = F.batch_norm(X, None, None, None, None, training=True)
    torch.testing.assert_close(Y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(Y)
    torch.testing.assert_close(torch.autograd.grad(Y, X, g)[0], torch.autograd.grad(ref, X, g)[0],
                               rtol=1e-12, atol=1e-12)


def test_momentum_bounds_are_exact():
    X, gamma, beta, mm, mv = _inputs((8, 3), torch.float64)
    _, keep_mm, keep_mv = batch_norm(X, gamma, beta, mm, mv, momentum=0.0)
    assert torch.equal(keep_mm, mm) and torch.equal(keep_mv, mv)
    _, new_mm, _ = batch_norm(X, gamma, beta, mm, mv, momentum=1.0)
    torch.testing.assert_close(new_mm, X.detach().mean(0), rtol=1e-12, atol=1e-12)


def test_channels_last_input():
    X = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    Y, _, _ = batch_norm(X, None, None, None, None)
    torch.testing.assert_close(Y, F.batch_norm(X, None, None, training=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, X_shape, message", [
    ({}, (5,), "rank 2 to 5"),
    ({}, (2, 3, 2, 2, 2, 2), "rank 2 to 5"),
    ({}, (1, 3), "more than 1 value per channel"),
    ({}, (1, 3, 1, 1), "more than 1 value per channel"),
    ({"eps": 0.0}, (4, 3), "eps must be > 0"),
    ({"eps": -1e-5}, (4, 3), "eps must be > 0"),
    ({"momentum": 1.5}, (4, 3), "momentum must be in [0, 1]"),
    ({"momentum": -0.1}, (4, 3), "momentum must be in [0, 1]"),
])
def test_bad_input_gets_clear_errors(kwargs, X_shape, message):
    C = X_shape[1] if len(X_shape) > 1 else 3
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        batch_norm(torch.randn(X_shape), torch.ones(C), torch.zeros(C), torch.zeros(C),
                   torch.ones(C), **kwargs)


def test_channel_count_mismatch_names_the_argument():
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\).*got \(3,\)"):
        batch_norm(torch.randn(8, 4), torch.ones(3), torch.zeros(4), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"moving_var must have shape \(4,\)"):
        batch_norm(torch.randn(8, 4), torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(5))


def test_one_value_per_channel_is_fine_in_eval():
    Y, _, _ = batch_norm(torch.randn(1, 3), torch.ones(3), torch.zeros(3), torch.zeros(3),
                         torch.ones(3), training=False)
    assert Y.shape == (1, 3)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, None, None)
