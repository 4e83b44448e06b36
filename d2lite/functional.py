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
        return torch.mul(X, scale.view(shape)).add_(shift.view(shape)), moving_mean, moving_var
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
    Exact in the sense PyTorch's kernel is: the mean is accumulated in float64 (over the means of
    contiguous rows), the variance takes a second pass over X - mean, and every sum in the
    backward centres X before multiplying, so float32 loses nothing to cancellation when
    |mean| >> std. (``torch.var_mean``'s one-pass Welford loop is several times slower on the CPU.)

    Fast by doing little: no autograd graph; few operations, each over the whole tensor (on two
    threads each one over 32K elements is a parallel region, and on a busy machine every region
    can wait for a core); reductions without temporaries where there is one (row means, row
    norms, and for large inputs batched dot products); outputs written into buffers already there.
    """

    @staticmethod
    def forward(ctx, X, gamma, beta, eps):
        channels_last = _is_channels_last(X)
        Xv = _rows(X, channels_last)  # (N, C, L), or (M, C) for 2-D and channels-last input
        C, count = X.shape[1], Xv.numel() // X.shape[1]
        shape = (1, C, 1) if Xv.dim() == 3 else (1, C)
        rows = Xv.mean(2) if Xv.dim() == 3 else Xv  # (N, C)
        mean = rows.mean(0, dtype=torch.float64).to(X.dtype).view(shape)
        xc = Xv - mean
        if Xv.dim() == 3:  # sum of squares = squared norms of contiguous rows, summed
            var = torch.linalg.vector_norm(xc, dim=2).square_().sum(0).div_(count).view(shape)
        else:
            var = (xc * xc).sum(0).div_(count).view(shape)
        inv_std = (var + eps).rsqrt_()
        scale = inv_std if gamma is None else inv_std * gamma.view(shape)
        # Large inputs save X instead of X - mean (one full-size buffer fewer: Y is written into
        # xc's) and the backward recomputes X - mean.
        ctx.save_x = Xv.numel() * Xv.element_size() > _SAVE_X_BYTES
        Yv = torch.mul(xc, scale, out=xc if ctx.save_x else None)
        if beta is not None:  # (mul, add_ is faster than addcmul with two broadcast factors)
            Yv.add_(beta.view(shape))
        ctx.save_for_backward(Xv if ctx.save_x else xc, mean, inv_std, scale)
        ctx.layout = (channels_last, count)
        mean, var = mean.view(C), var.view(C)
        ctx.mark_non_differentiable(mean, var)
        return _unrows(Yv, X, channels_last), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, _dmean, _dvar):
        saved, mean, inv_std, scale = ctx.saved_tensors
        channels_last, count = ctx.layout
        dYv = _rows(dY, channels_last)
        xc = saved - mean if ctx.save_x else saved
        if xc.dim() == 3:
            dbeta = dYv.sum(2).sum(0)
            if ctx.save_x:  # batched dot products of rows: no full-size temporary
                N, C, L = xc.shape
                dot = torch.bmm(dYv.reshape(N * C, 1, L), xc.view(N * C, L, 1)).view(N, C).sum(0)
                buffer = xc
            else:
                buffer = dYv * xc
                dot = buffer.sum(2).sum(0)
        else:
            dbeta = dYv.sum(0)
            buffer = dYv * xc
            dot = buffer.sum(0)
        dbeta, dgamma = dbeta.view(scale.shape), dot.view(scale.shape).mul_(inv_std)
        dX = None
        if ctx.needs_input_grad[0]:
            # dX = k * (dY - dbeta/M - xhat * dgamma/M), k = gamma/std, xhat = (X - mean)/std
            a = scale / -count
            c_xc = dgamma * inv_std * a
            if buffer is xc:
                dXv = xc.mul_(c_xc).add_(dbeta * a).addcmul_(dYv, scale)
            else:
                dXv = torch.mul(dYv, scale, out=buffer).add_(dbeta * a).addcmul_(xc, c_xc)
            dX = _unrows(dXv, dY, channels_last)
        dgamma_out = dgamma.view(-1) if ctx.needs_input_grad[1] else None
        dbeta_out = dbeta.view(-1) if ctx.needs_input_grad[2] else None
        return dX, dgamma_out, dbeta_out, None


# Inputs larger than this save X rather than X - mean for the backward (see _BatchNormTrain):
# on the CPU a fresh allocation this large is paid in page faults.
_SAVE_X_BYTES = 16 << 20


def _is_channels_last(X: torch.Tensor) -> bool:
    """True for (N, C, ...) input stored channels-last (N, ..., C), the layout of convolutions in
    channels_last memory format: it is then viewed as (M, C) rows without a copy."""
    return X.dim() > 2 and not X.is_contiguous() and X.movedim(1, -1).is_contiguous()


def _rows(T: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """T as (N, C, L) (L: the product of the spatial sizes) or (M, C), copied only if needed."""
    if channels_last:
        return T.movedim(1, -1).reshape(-1, T.shape[1])
    if T.dim() == 2:
        return T.contiguous()
    return T.reshape(T.shape[0], T.shape[1], -1)


def _unrows(Tv: torch.Tensor, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Undo :func:`_rows`: Tv back to the shape (and layout) of ``like``."""
    if channels_last:
        return Tv.view(like.movedim(1, -1).shape).movedim(-1, 1)
    return Tv.view(like.shape)


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
