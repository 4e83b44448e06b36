"""Drop-in ``nn.Conv2d`` and ``nn.AvgPool2d`` with faster CPU paths for LeNet, same numbers.

:func:`d2lite.lenet` builds its networks from these. Each is a subclass of the torch layer it
replaces (same constructor, parameters, state_dict, repr and ``isinstance``), and takes its fast
path only where the measurements in benchmarks/results/ showed one; everywhere else it is the torch
layer unchanged.

- :class:`Conv2d` with one input channel (LeNet's first layer) on the CPU: the forward is
  PyTorch's; the backward gives oneDNN the input with channels-last strides, which for one channel
  are the same memory, and oneDNN's weight gradient then takes 2.3 ms instead of 7 ms for a batch
  of 256 28x28 images on one core (its NCHW weight-gradient kernel is slow for a single channel).
- :class:`AvgPool2d` with non-overlapping windows (``kernel_size == stride``, no padding): the
  window sums are whole-tensor additions of strided views, in the order ATen's kernel adds (so
  the result is the same to the bit), 8x faster than ATen's CPU kernel for (256, 6, 24, 24); the
  backward spreads ``grad / k**2`` with two broadcast copies, 2x faster than ATen's.

Both backwards are differentiable (second derivatives work). Under TorchScript, tracing,
torch.func transforms, forward-mode AD and CPU autocast, and for half-precision pooling, the
layers run the torch layers' own code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2d", "AvgPool2d"]


class Conv2d(nn.Conv2d):
    """``nn.Conv2d``, with a faster backward on the CPU when there is one input channel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript compiles only the torch layer's path)
            if _single_channel_fast_path(self, input):
                return self._fast_forward(input)
        return self._conv_forward(input, self.weight, self.bias)

    @torch.jit.unused
    def _fast_forward(self, input: torch.Tensor) -> torch.Tensor:
        return _SingleChannelConv2d.apply(input, self.weight, self.bias, self.stride,
                                          self.padding, self.dilation)


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d``, faster on the CPU for non-overlapping windows without padding."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if _window_mean_fast_path(self, input):
                return self._fast_forward(input)
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)

    @torch.jit.unused
    def _fast_forward(self, input: torch.Tensor) -> torch.Tensor:
        return _WindowMean.apply(input, _pair(self.kernel_size))


def _pair(value) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(value) * 2 if len(value) == 1 else tuple(value)
    return (value, value)


def _plain_autograd() -> bool:
    """False under what an autograd.Function without jvp/vmap rules or a TorchScript graph
    cannot serve: tracing, functorch transforms (vmap, grad), forward-mode AD, CPU autocast."""
    return not (torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
                or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
                or torch.is_autocast_enabled("cpu"))


def _window_mean_fast_path(pool: nn.AvgPool2d, x: torch.Tensor) -> bool:
    if not _plain_autograd():
        return False
    k = _pair(pool.kernel_size)
    # float32/float64 only: ATen adds half-precision windows in float32 and rounds once
    return (x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous()
            and x.dtype in (torch.float32, torch.float64) and len(k) == 2 and min(k) > 0
            and k == _pair(pool.stride or pool.kernel_size) and _pair(pool.padding) == (0, 0)
            and not pool.ceil_mode and pool.divisor_override is None
            and x.shape[2] >= k[0] and x.shape[3] >= k[1])


def _single_channel_fast_path(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    if not _plain_autograd():
        return False
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] == 1 and x.is_contiguous()
            and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and torch.is_grad_enabled()
            and (x.requires_grad or conv.weight.requires_grad))


class _SingleChannelConv2d(torch.autograd.Function):
    """F.conv2d forward; backward through oneDNN with the (N, 1, H, W) input seen channels-last."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.config = (stride, padding, dilation, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):  # differentiable ops only: second derivatives work through it
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.config
        N, _, H, W = x.shape
        x_channels_last = x.as_strided(x.shape, (H * W, 1, W, 1))  # the same memory
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                has_bias and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.convolution_backward(
            grad, x_channels_last, weight, [weight.shape[0]] if has_bias else None, stride,
            padding, dilation, False, [0, 0], 1, mask)
        return (dx.contiguous() if dx is not None else None), dw, db, None, None, None


class _WindowMean(torch.autograd.Function):
    """Average over non-overlapping kh x kw windows of (N, C, H, W); sums in ATen's order."""

    @staticmethod
    def forward(ctx, x, k):
        kh, kw = k
        N, C, H, W = x.shape
        Ho, Wo = H // kh, W // kw
        windows = x[:, :, :Ho * kh, :Wo * kw].reshape(N, C, Ho, kh, Wo, kw)
        out = windows[:, :, :, 0, :, 0].clone(memory_format=torch.contiguous_format)
        for i in range(kh):  # row by row, left to right, as ATen's loop adds
            for j in range(kw):
                if i or j:
                    out.add_(windows[:, :, :, i, :, j])
        ctx.config = (x.shape, k)
        return out.div_(kh * kw)

    @staticmethod
    def backward(ctx, grad):  # linear in grad, differentiable ops only
        (N, C, H, W), (kh, kw) = ctx.config
        Ho, Wo = grad.shape[2], grad.shape[3]
        g = grad.div(kh * kw)
        # spread along the width, then the height: two copies with contiguous inner runs
        rows = g.unsqueeze(-1).expand(N, C, Ho, Wo, kw).reshape(N, C, Ho, 1, Wo * kw)
        spread = rows.expand(N, C, Ho, kh, Wo * kw).reshape(N, C, Ho * kh, Wo * kw)
        if (Ho * kh, Wo * kw) == (H, W):
            return spread, None
        dx = grad.new_zeros((N, C, H, W))  # rows and columns no window covers get no gradient
        dx[:, :, :Ho * kh, :Wo * kw] = spread
        return dx, None
