"""Batch normalization from scratch: the function behind d2lite.BatchNorm, exact to PyTorch's."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["batch_norm"]


def batch_norm(X: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
               moving_mean: torch.Tensor | None, moving_var: torch.Tensor | None,
               eps: float = 1e-5, momentum: float = 0.1, training: bool = True):
    """Normalize ``X`` per channel, then scale by ``gamma`` and shift by ``beta``.

    X: input of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); the channel axis is 1.
    gamma, beta: scale and shift of shape (C,), or ``None`` for 1 and 0 (``affine=False``).
    moving_mean, moving_var: running statistics of shape (C,), or both ``None`` (no tracking).
    eps: added to the variance before the square root (> 0).
    momentum: weight of the new batch statistic in the running average, in [0, 1]; PyTorch's
        convention: ``new = (1 - momentum) * old + momentum * batch`` (0.1 means "mostly old").
    training: True normalizes with the statistics of this batch (mean and *biased* variance over
        every axis but the channel axis) and updates the running statistics with the mean and the
        *unbiased* variance, as PyTorch does; False normalizes with the running statistics and
        returns them unchanged.

    Returns ``(Y, moving_mean, moving_var)``: Y has the shape of X; the statistics are new tensors
    that carry no autograd graph (the ones passed in are not modified), or ``None`` if not tracked.
    """
    _check_inputs(X, gamma, beta, moving_mean, moving_var, eps, momentum, training)
    shape = (1, X.shape[1]) + (1,) * (X.dim() - 2)
    if not training:
        if moving_mean is None:
            raise ValueError("training=False needs moving_mean and moving_var to normalize with")
        inv_std = torch.rsqrt(moving_var.to(X.dtype) + eps)
        scale = inv_std if gamma is None else gamma * inv_std
        shift = -moving_mean.to(X.dtype) * scale if beta is None else beta - moving_mean * scale
        return torch.addcmul(shift.view(shape), X, scale.view(shape)), moving_mean, moving_var
    Y, mean, var = _BatchNormTrain.apply(X, gamma, beta, eps)
    if moving_mean is None:
        return Y, None, None
    with torch.no_grad():
        count = X.numel() // X.shape[1]
        unbiased = var * (count / (count - 1))
        new_mean = torch.lerp(moving_mean, mean.to(moving_mean.dtype), momentum)
        new_var = torch.lerp(moving_var, unbiased.to(moving_var.dtype), momentum)
    return Y, new_mean, new_var


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm with the analytic backward (CS231n's ``batchnorm_backward_alt``).

    Forward returns (Y, batch mean, biased batch variance); the statistics are not differentiable.
    """

    @staticmethod
    def forward(ctx, X, gamma, beta, eps):
        dims = [0] + list(range(2, X.dim()))
        shape = (1, X.shape[1]) + (1,) * (X.dim() - 2)
        var, mean = torch.var_mean(X, dim=dims, correction=0)
        inv_std = torch.rsqrt(var + eps)
        scale = inv_std if gamma is None else gamma * inv_std
        shift = -mean * scale if beta is None else beta - mean * scale
        Y = torch.addcmul(shift.view(shape), X, scale.view(shape))
        ctx.save_for_backward(X, gamma, mean, inv_std)
        ctx.mark_non_differentiable(mean, var)
        return Y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, _dmean, _dvar):
        X, gamma, mean, inv_std = ctx.saved_tensors
        dims = [0] + list(range(2, X.dim()))
        shape = (1, X.shape[1]) + (1,) * (X.dim() - 2)
        count = X.numel() // X.shape[1]
        dbeta = dY.sum(dims)
        centered = X - mean.view(shape)  # kept explicit: X*b + c would cancel badly in float32
        dgamma = (dY * centered).sum(dims) * inv_std
        dX = None
        if ctx.needs_input_grad[0]:
            k = inv_std if gamma is None else gamma * inv_std
            # dX = k * (dY - dbeta/M - xhat * dgamma/M), xhat = centered * inv_std
            dX = torch.addcmul((-k * dbeta / count).view(shape), dY, k.view(shape))
            dX.addcmul_(centered, (-k * inv_std * dgamma / count).view(shape))
        dgamma_out = dgamma if gamma is not None and ctx.needs_input_grad[1] else None
        dbeta_out = dbeta if ctx.needs_input_grad[2] else None
        return dX, dgamma_out, dbeta_out, None


def _check_inputs(X, gamma, beta, moving_mean, moving_var, eps, momentum, training):
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if not 2 <= X.dim() <= 5:
        raise ValueError("batch_norm expects X of shape (N, C), (N, C, L), (N, C, H, W) or "
                         f"(N, C, D, H, W): rank 2 to 5, got rank {X.dim()} (shape {tuple(X.shape)})")
    if not X.is_floating_point():
        raise TypeError(f"X must be a floating-point tensor, got {X.dtype}")
    C = X.shape[1]
    for name, t in (("gamma", gamma), ("beta", beta), ("moving_mean", moving_mean),
                    ("moving_var", moving_var)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},), one value per channel of X "
                             f"(X has shape {tuple(X.shape)}, channels on axis 1), got {tuple(t.shape)}")
    if (moving_mean is None) != (moving_var is None):
        raise ValueError("pass both moving_mean and moving_var, or neither")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps the division finite), got {eps!r}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1] (the weight of the new batch statistic), "
                         f"got {momentum!r}")
    if training and X.numel() // max(C, 1) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(X.shape)}: batch statistics of a single value are undefined")
