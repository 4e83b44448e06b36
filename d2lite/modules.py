"""BatchNorm, the nn.Module around d2lite.batch_norm, interchangeable with nn.BatchNorm1d/2d/3d."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import batch_norm

__all__ = ["BatchNorm", "convert_batchnorm"]

# d2lite's names and PyTorch's for the same state
_TORCH_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                "moving_var": "running_var"}


class BatchNorm(nn.Module):
    """Batch normalization over the channel axis of (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W).

    The same arguments and behaviour as ``nn.BatchNorm1d/2d/3d`` (one class for every rank):
    ``gamma``/``beta`` are the learned scale and shift (PyTorch's ``weight``/``bias``);
    ``moving_mean``/``moving_var`` are buffers (PyTorch's ``running_mean``/``running_var``), so
    ``state_dict``, ``.to(device)``, ``.double()`` and ``copy.deepcopy`` carry them. The mode
    follows ``module.training`` (``net.train()`` / ``net.eval()``). ``momentum=None`` uses the
    cumulative average 1/num_batches_tracked. A state_dict of ``nn.BatchNorm1d/2d/3d`` loads as is.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"num_features must be a positive int (the number of channels), "
                             f"got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.gamma = nn.Parameter(torch.ones(num_features, **factory))
            self.beta = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("gamma", None)
            self.register_parameter("beta", None)
        if track_running_stats:
            self.register_buffer("moving_mean", torch.zeros(num_features, **factory))
            self.register_buffer("moving_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("moving_mean", None)
            self.register_buffer("moving_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.moving_mean.zero_()
            self.moving_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.gamma)
            nn.init.zeros_(self.beta)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if X.dim() >= 2 and X.shape[1] != self.num_features:
            raise ValueError(f"{self._get_name()}({self.num_features}) got X of shape "
                             f"{tuple(X.shape)}: expected {self.num_features} channels on axis 1")
        # As PyTorch: without running statistics, normalize with batch statistics even in eval.
        use_batch_stats = self.training or self.moving_mean is None
        update = self.training and self.track_running_stats
        momentum = 0.0
        if update:
            self.num_batches_tracked.add_(1)
            momentum = (1.0 / self.num_batches_tracked.item() if self.momentum is None
                        else self.momentum)
        Y, mean, var = self._normalize(X, self.gamma, self.beta,
                                       self.moving_mean if (update or not use_batch_stats) else None,
                                       self.moving_var if (update or not use_batch_stats) else None,
                                       eps=self.eps, momentum=momentum, training=use_batch_stats)
        if update:
            with torch.no_grad():
                self.moving_mean.copy_(mean)
                self.moving_var.copy_(var)
        return Y

    def _normalize(self, X, gamma, beta, moving_mean, moving_var, *, eps, momentum, training):
        """The function that normalizes (``d2lite.batch_norm``; SyncBatchNorm's synchronizes)."""
        return batch_norm(X, gamma, beta, moving_mean, moving_var, eps=eps, momentum=momentum,
                          training=training)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for ours, theirs in _TORCH_NAMES.items():
            if prefix + theirs in state_dict and prefix + ours not in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def torch_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's state under PyTorch's names (weight, bias, running_mean, …)."""
        return {_TORCH_NAMES.get(k, k): v for k, v in self.state_dict().items()}

    @classmethod
    def from_torch(cls, bn: _BatchNorm) -> "BatchNorm":
        """A d2lite BatchNorm with the settings, parameters and statistics of ``bn``."""
        ref = bn.weight if bn.weight is not None else bn.running_mean
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device=ref.device if ref is not None else None,
                  dtype=ref.dtype if ref is not None else None)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        if bn.affine:
            new.gamma.requires_grad_(bn.weight.requires_grad)
            new.beta.requires_grad_(bn.bias.requires_grad)
        return new

    def to_torch(self, cls: type[_BatchNorm] = nn.BatchNorm2d) -> _BatchNorm:
        """The same layer as a PyTorch module: ``cls`` is nn.BatchNorm1d, 2d (default) or 3d."""
        ref = self.gamma if self.affine else self.moving_mean
        bn = cls(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
                 device=ref.device if ref is not None else None,
                 dtype=ref.dtype if ref is not None else None)
        bn.load_state_dict(self.torch_state_dict())
        bn.train(self.training)
        return bn


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` (and SyncBatchNorm) in ``module`` by d2lite's
    BatchNorm with the same state, the way ``nn.SyncBatchNorm.convert_sync_batchnorm`` does;
    returns the converted module (``module`` itself converted in place unless it is a batch norm)."""
    if isinstance(module, _BatchNorm):
        return BatchNorm.from_torch(module)
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
