"""Batch renormalization (Ioffe, 2017): batch norm corrected towards its running statistics, for
small or non-i.i.d. batches, with the r_max/d_max warm-up of the paper."""
from __future__ import annotations

import torch
from torch import nn

from .functional import _check_inputs, batch_norm

__all__ = ["batch_renorm", "BatchRenorm"]


def batch_renorm(X: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                 moving_mean: torch.Tensor, moving_var: torch.Tensor, r_max: float, d_max: float,
                 eps: float = 1e-5, momentum: float = 0.1):
    """Training-mode batch renormalization of X of shape (N, C, ...) (channels on axis 1).

    With the batch's mean and standard deviation μ_B, σ_B and the running ones μ, σ (both
    standard deviations include eps): ``x̂ = (x - μ_B) / σ_B * r + d`` with
    ``r = clip(σ_B / σ, 1/r_max, r_max)`` and ``d = clip((μ_B - μ) / σ, -d_max, d_max)`` treated
    as constants in backprop, then ``Y = γ x̂ + β``. r_max = 1, d_max = 0 is batch norm; no
    clipping gives inference-mode batch norm's output (with batch norm's gradient).

    Returns ``(Y, new_moving_mean, new_moving_var)``, the statistics updated as PyTorch's batch
    norm does (momentum on the new value, the unbiased variance).
    """
    _check_inputs(X, gamma, beta, moving_mean, moving_var, eps, momentum, training=True)
    if moving_mean is None:
        raise ValueError("batch renormalization needs moving_mean and moving_var (its r and d "
                         "compare the batch with them)")
    if not r_max >= 1 or not d_max >= 0:
        raise ValueError(f"r_max must be >= 1 and d_max >= 0, got r_max={r_max!r}, d_max={d_max!r}")
    shape = (1, X.shape[1]) + (1,) * (X.dim() - 2)
    dims = [0, *range(2, X.dim())]
    mean = X.mean(dims)
    var = X.var(dims, correction=0)
    sigma_batch = (var + eps).sqrt()
    sigma = (moving_var.to(X.dtype) + eps).sqrt()
    r = (sigma_batch / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - moving_mean.to(X.dtype)) / sigma).clamp(-d_max, d_max).detach()
    X_hat = (X - mean.view(shape)) * (r / sigma_batch).view(shape) + d.view(shape)
    Y = X_hat if gamma is None else X_hat * gamma.view(shape)
    if beta is not None:
        Y = Y + beta.view(shape)
    with torch.no_grad():
        count = X.numel() // X.shape[1]
        new_mean = torch.lerp(moving_mean, mean.detach().to(moving_mean.dtype), momentum)
        new_var = torch.lerp(moving_var, (var.detach() * (count / (count - 1))).to(moving_var.dtype),
                             momentum)
    return Y, new_mean, new_var


class BatchRenorm(nn.Module):
    """Batch renormalization over the channel axis of (N, C, ...), a drop-in for BatchNorm.

    r_max, d_max: the clipping limits reached after the warm-up (the paper's 3 and 5).
    warmup_steps: training steps of plain batch norm (r_max = 1, d_max = 0) before the limits
        start to relax; ramp_steps: steps over which they then grow linearly to r_max and d_max
        (the paper: 5k steps of batch norm, then r_max to 3 over 40k steps and d_max to 5 over
        25k; scale them to your run). The step count is ``num_batches_tracked``, in the state.
    Evaluation mode normalizes with the running statistics, as batch norm does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0,
                 ramp_steps: int = 0, affine: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not r_max >= 1 or not d_max >= 0:
            raise ValueError(f"r_max must be >= 1 and d_max >= 0, got {r_max!r}, {d_max!r}")
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError("warmup_steps and ramp_steps must be >= 0")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps, self.ramp_steps, self.affine = warmup_steps, ramp_steps, affine
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.gamma = nn.Parameter(torch.ones(num_features, **factory))
            self.beta = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("gamma", None)
            self.register_parameter("beta", None)
        self.register_buffer("moving_mean", torch.zeros(num_features, **factory))
        self.register_buffer("moving_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def limits(self) -> tuple[float, float]:
        """(r_max, d_max) for the next training step, following the warm-up schedule."""
        step = int(self.num_batches_tracked)
        if step < self.warmup_steps:
            return 1.0, 0.0
        progress = 1.0 if self.ramp_steps == 0 else min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        return 1.0 + (self.r_max - 1.0) * progress, self.d_max * progress

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return batch_norm(X, self.gamma, self.beta, self.moving_mean, self.moving_var,
                              eps=self.eps, training=False)[0]
        r_max, d_max = self.limits()
        Y, mean, var = batch_renorm(X, self.gamma, self.beta, self.moving_mean, self.moving_var,
                                    r_max, d_max, eps=self.eps, momentum=self.momentum)
        with torch.no_grad():
            self.moving_mean.copy_(mean)
            self.moving_var.copy_(var)
            self.num_batches_tracked.add_(1)
        return Y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
                f"d_max={self.d_max}, warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}")
