"""Batch norm synchronized across processes, from scratch on torch.distributed (gloo on the CPU).

PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors; this one runs wherever ``torch.distributed``
does. One batch is split over the processes of a group ("ranks"); in training mode every rank
normalizes its slice with the statistics of the *whole* batch, as if one process had seen it:

- forward: each rank computes its per-channel count, mean and sum of squared deviations (M2); one
  ``all_gather`` brings every rank's triple, merged with Chan's parallel algorithm (counts may
  differ between ranks, and a rank may have no example at all);
- backward: one ``all_reduce`` of the per-channel sums ``sum(dY)`` and ``sum(dY * (X - mean))``,
  the only two quantities of the batch-norm gradient that depend on the whole batch.

The γ/β gradients each rank returns are those of its own slice, as ``nn.SyncBatchNorm``'s are:
the data-parallel all-reduce (DDP) sums them. Evaluation mode communicates nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import _check_inputs, batch_norm
from .modules import BatchNorm

__all__ = ["sync_batch_norm", "SyncBatchNorm", "convert_sync_batchnorm", "world_size",
           "merge_moments"]


def world_size(group=None) -> int:
    """The number of processes in ``group`` (default: the whole world); 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """Merge per-rank moments into the moments of the union (Chan, Golub and LeVeque, 1979).

    counts: (R,) examples per channel on each of R ranks (0 allowed); means, m2s: (R, C) each rank's
    per-channel mean and sum of squared deviations from its own mean. Returns ``(count, mean, m2)``
    of the union: a number and two (C,) tensors. M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2.
    """
    count = counts.sum()
    weights = (counts / count.clamp(min=1)).unsqueeze(1)  # (R, 1); a rank with no example weighs 0
    mean = (weights * means).sum(0)
    m2 = m2s.sum(0) + (counts.unsqueeze(1) * (means - mean).square()).sum(0)
    return count, mean, m2


def sync_batch_norm(X: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                    moving_mean: torch.Tensor | None, moving_var: torch.Tensor | None,
                    eps: float = 1e-5, momentum: float = 0.1, training: bool = True, group=None):
    """:func:`d2lite.batch_norm` with the batch statistics of every rank of ``group`` together.

    Same arguments, shapes and return value as :func:`d2lite.batch_norm`; ``group`` is a
    ``torch.distributed`` process group (default: the whole world). Every rank of the group must
    call it at the same point, with the same channels and dtype; X's batch size may differ between
    ranks, and may be 0. The running statistics are updated with the mean and the *unbiased*
    variance of the whole batch (the global count in Bessel's correction), so they stay equal on
    every rank. Without an initialized process group, with a group of one, or with
    ``training=False`` it communicates nothing and is exactly :func:`d2lite.batch_norm`.
    """
    if not training or world_size(group) == 1:
        return batch_norm(X, gamma, beta, moving_mean, moving_var, eps=eps, momentum=momentum,
                          training=training)
    _check_inputs(X, gamma, beta, moving_mean, moving_var, eps, momentum, training=False)
    Y, mean, var, count = _SyncBatchNormTrain.apply(X, gamma, beta, eps, group)
    count = count.item()
    if moving_mean is None:
        return Y, None, None
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        new_mean = torch.lerp(moving_mean, mean.to(moving_mean.dtype), momentum)
        new_var = torch.lerp(moving_var, unbiased.to(moving_var.dtype), momentum)
    return Y, new_mean, new_var


class _SyncBatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm over the union of the ranks' batches.

    Forward returns (Y, global mean, global biased variance, global count per channel); only Y is
    differentiable. The moments travel in float64 whatever X's dtype (C + C + 1 numbers a rank),
    so merging them loses nothing; the backward's two sums travel in X's dtype, as PyTorch's do.
    """

    @staticmethod
    def forward(ctx, X, gamma, beta, eps, group):
        C = X.shape[1]
        dims = [0, *range(2, X.dim())]
        shape = (1, C) + (1,) * (X.dim() - 2)
        n = X.numel() // C if C else 0
        local = torch.zeros(2 * C + 1, dtype=torch.float64, device=X.device)
        local[0] = n
        if n:
            local_mean = X.sum(dims, dtype=torch.float64) / n
            local[1:C + 1] = local_mean
            local[C + 1:] = (X - local_mean.to(X.dtype).view(shape)).to(torch.float64).square().sum(dims)
        gathered = [torch.empty_like(local) for _ in range(world_size(group))]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # (R, 2C + 1)
        count, mean, m2 = merge_moments(stats[:, 0], stats[:, 1:C + 1], stats[:, C + 1:])
        count = int(count.item())
        if count <= 1:  # every rank sees the same count, so every rank raises
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} "
                             f"over all {len(gathered)} processes (this one has input of shape "
                             f"{tuple(X.shape)}): batch statistics of a single value are undefined")
        var = m2 / count
        mean_x = mean.to(X.dtype).view(shape)
        inv_std = (var + eps).rsqrt().to(X.dtype).view(shape)
        xc = X - mean_x
        scale = inv_std if gamma is None else inv_std * gamma.view(shape)
        Y = xc * scale
        if beta is not None:
            Y = Y + beta.view(shape)
        ctx.save_for_backward(xc, inv_std, scale)
        ctx.group, ctx.count, ctx.dims = group, count, dims
        mean_out, var_out = mean.to(X.dtype), var.to(X.dtype)
        count_out = torch.tensor(float(count), dtype=torch.float64)
        ctx.mark_non_differentiable(mean_out, var_out, count_out)
        return Y, mean_out, var_out, count_out

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, _dmean, _dvar, _dcount):
        xc, inv_std, scale = ctx.saved_tensors
        C = xc.shape[1]
        sums = torch.cat([dY.sum(ctx.dims), (dY * xc).sum(ctx.dims)])  # this rank's
        dgamma = sums[C:] * inv_std.view(C) if ctx.needs_input_grad[1] else None
        dbeta = sums[:C].clone() if ctx.needs_input_grad[2] else None
        dX = None
        if ctx.needs_input_grad[0]:
            dist.all_reduce(sums, group=ctx.group)  # the whole batch's
            shape = inv_std.shape
            sum_dy, sum_dy_xc = sums[:C].view(shape), sums[C:].view(shape)
            # dX = gamma/std * (dY - sum(dY)/M - xhat * sum(dY * xhat)/M), M the global count
            dX = scale * (dY - sum_dy / ctx.count - xc * (inv_std * inv_std * sum_dy_xc / ctx.count))
        return dX, dgamma, dbeta, None, None


class SyncBatchNorm(BatchNorm):
    """:class:`d2lite.BatchNorm` whose training-mode statistics are those of the whole batch
    spread over the processes of ``process_group`` (default: the whole world).

    Same arguments and state as :class:`d2lite.BatchNorm` (and ``nn.SyncBatchNorm``'s
    ``process_group``); without an initialized process group, with a group of one, or in eval mode
    it is exactly :class:`d2lite.BatchNorm`. Build models with it, or convert them with
    :func:`convert_sync_batchnorm`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _normalize(self, X, gamma, beta, moving_mean, moving_var, *, eps, momentum, training):
        if self.training and training:
            return sync_batch_norm(X, gamma, beta, moving_mean, moving_var, eps=eps,
                                   momentum=momentum, training=True, group=self.process_group)
        return super()._normalize(X, gamma, beta, moving_mean, moving_var, eps=eps,
                                  momentum=momentum, training=training)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch norm of ``module`` (d2lite's ``BatchNorm``, ``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm``) by :class:`SyncBatchNorm`, as ``nn.SyncBatchNorm.convert_sync_batchnorm``
    does: the new layer *shares* the old one's parameters and buffers (an optimizer built before
    the conversion still updates them) and its mode. Returns the converted module (``module``
    itself, converted in place, unless it is a batch norm)."""
    if isinstance(module, (BatchNorm, _BatchNorm)) and not (
            isinstance(module, SyncBatchNorm) and module.process_group is process_group):
        torch_layer = isinstance(module, _BatchNorm)
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group=process_group)
        names = {"gamma": "weight", "beta": "bias"} if torch_layer else {}
        for ours in ("gamma", "beta"):
            setattr(new, ours, getattr(module, names.get(ours, ours)))
        names = {"moving_mean": "running_mean", "moving_var": "running_var"} if torch_layer else {}
        for ours in ("moving_mean", "moving_var", "num_batches_tracked"):
            new._buffers[ours] = getattr(module, names.get(ours, ours))
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
