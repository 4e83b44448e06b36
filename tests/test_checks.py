"""d2lite.checks: the notebooks' test helpers must pass right answers and teach on wrong ones."""
import pytest
import torch

from d2lite import assert_close, check_gradients, numerical_gradient, rel_error


def test_rel_error():
    assert rel_error(torch.ones(3), torch.ones(3)) == 0
    assert rel_error([1.0, 2.0], [1.0, 2.2]) == pytest.approx(0.2 / 4.2)


def test_assert_close_passes_and_explains_failures():
    assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-7]), "Y")
    with pytest.raises(AssertionError) as info:
        assert_close(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]), "the output Y",
                     hint="did you use the unbiased variance?")
    message = str(info.value)
    assert "the output Y: expected [1.0, 2.0], got [1.0, 2.5]" in message
    assert "at index (1,)" in message and "Hint: did you use the unbiased variance?" in message


def test_assert_close_names_shape_and_none():
    with pytest.raises(AssertionError, match=r"moving_mean: expected shape \(3,\), got shape \(1, 3\)"):
        assert_close(torch.zeros(1, 3), torch.zeros(3), "moving_mean")
    with pytest.raises(AssertionError, match="got None"):
        assert_close(None, torch.zeros(3), "Y")


def test_assert_close_large_tensors_are_summarized():
    with pytest.raises(AssertionError, match="a tensor of shape \\(4, 5\\)"):
        assert_close(torch.ones(4, 5), torch.zeros(4, 5), "Y")


def test_numerical_gradient_of_known_function():
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(numerical_gradient(lambda t: t ** 3, x), 3 * x ** 2, rtol=1e-6, atol=1e-6)


def test_check_gradients_accepts_right_and_rejects_wrong_backward():
    check_gradients(lambda a, b: a * b.sin(), torch.randn(3), torch.randn(3), names=["a", "b"])

    class WrongSquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x  # forgot the factor 2

    with pytest.raises(AssertionError, match="the gradient of x"):
        check_gradients(WrongSquare.apply, torch.randn(4), names=["x"])


def test_forbid_calls_blocks_library_batch_norm_and_aliases():
    import torch.nn.functional as F

    import d2lite
    from d2lite.checks import forbid_calls

    namespace = {"bn_alias": F.batch_norm}
    X = torch.randn(4, 3)
    with forbid_calls(namespace=namespace):
        with pytest.raises(AssertionError, match="your code called torch.nn.functional.batch_norm"):
            F.batch_norm(X, None, None, training=True)
        with pytest.raises(AssertionError, match="d2lite.batch_norm"):
            d2lite.batch_norm(X, None, None, None, None)
        with pytest.raises(AssertionError, match="torch.nn.functional.batch_norm"):
            namespace["bn_alias"](X, None, None, training=True)
        (X - X.mean(0)) / X.var(0, unbiased=False).add(1e-5).sqrt()  # own work is fine
    assert F.batch_norm(X, None, None, training=True).shape == (4, 3)  # restored
    assert namespace["bn_alias"] is F.batch_norm
