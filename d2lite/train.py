"""The training loop of the book (d2l's ``train_ch6``), recording a History per epoch."""
from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .history import EpochStats, History  # re-exported: ``from d2lite.train import History`` works

__all__ = ["EpochStats", "History", "train", "evaluate_accuracy", "accuracy", "try_gpu",
           "init_xavier", "make_optimizer", "keep_freed_memory", "set_live_view"]

Callback = Callable[[History], None]  # called with the History after every epoch; may have close()

# What train() draws with when it animates. The loop knows nothing of plotting, as minGPT's
# Trainer knows nothing of what its callbacks show: d2lite/__init__.py installs d2lite.plot's
# LivePlot and in_notebook_default here (see set_live_view).
_live_view: Callable[..., Callback] | None = None
_animate_by_default: Callable[[], bool] | None = None


def set_live_view(make_view: Callable[..., Callback] | None,
                  animate_by_default: Callable[[], bool] | None = None) -> None:
    """Install the live view :func:`train` adds to its callbacks when it animates.

    make_view: ``make_view(title=str | None, num_epochs=int) -> callback``, e.g.
        :class:`d2lite.plot.LivePlot` (installed when ``d2lite`` is imported); None: no live view.
    animate_by_default: ``() -> bool``, whether ``train(animate=None)`` animates, e.g.
        :func:`d2lite.plot.in_notebook_default`; None: it never does.
    """
    global _live_view, _animate_by_default
    _live_view, _animate_by_default = make_view, animate_by_default


def try_gpu(i: int = 0) -> torch.device:
    """``cuda:i`` if there is such a GPU, else Apple's ``mps``, else the CPU."""
    if torch.cuda.device_count() > i:
        return torch.device(f"cuda:{i}")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_xavier(module: nn.Module) -> None:
    """d2l's initialization: Xavier-uniform weights for every Linear and Conv layer."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        nn.init.xavier_uniform_(module.weight)


def accuracy(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The number of correct predictions (a 0-d tensor).

    y_hat: logits of shape (B, K) or predicted labels of shape (B,); y: labels of shape (B,).
    """
    if y_hat.dim() > 1 and y_hat.shape[1] > 1:
        y_hat = y_hat.argmax(dim=1)
    return (y_hat.to(y.dtype) == y).sum()


@torch.no_grad()
def evaluate_accuracy(net: nn.Module, data_iter: Iterable, device=None) -> float:
    """Accuracy of ``net`` on ``data_iter`` in eval mode; the net's mode is restored after."""
    device = torch.device(device) if device is not None else _device_of(net)
    was_training = net.training
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    try:
        for X, y in data_iter:
            X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct += accuracy(net(X), y)
            total += y.numel()
    finally:
        net.train(was_training)
    if total == 0:
        raise ValueError("evaluate_accuracy got an empty data iterator")
    return correct.item() / total


def make_optimizer(optimizer, params, lr: float) -> torch.optim.Optimizer:
    """``"sgd"`` (d2l's), ``"adam"``, or a callable ``(params, lr) -> Optimizer``."""
    if callable(optimizer):
        return optimizer(params, lr)
    choices = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    if optimizer not in choices:
        raise ValueError(f"optimizer must be one of {sorted(choices)} or a callable (params, lr), "
                         f"got {optimizer!r}")
    return choices[optimizer](params, lr=lr)


def train(net: nn.Module, train_iter: Iterable, test_iter: Iterable, num_epochs: int, lr: float,
          device=None, *, optimizer="sgd",
          scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
          loss: nn.Module | None = None, init: Callable[[nn.Module], None] | None = init_xavier,
          name: str = "", animate: bool | None = None, progress: bool | None = None,
          verbose: bool = True,
          callbacks: Sequence[Callback] = ()) -> History:
    """Train ``net`` as d2l's ``train_ch6`` does and return its :class:`History`.

    train_iter, test_iter: iterables of ``(X, y)``, X of shape (B, ...) and y labels of shape (B,).
    device: where to train (default: :func:`try_gpu`). optimizer: ``"sgd"`` (d2l's), ``"adam"`` or
    a callable ``(params, lr)``. scheduler: a callable ``optimizer -> LR scheduler``, stepped after
    every epoch (``lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5, 0.1)``). init: applied with
    ``net.apply`` before training (``None`` keeps the net's weights). animate: draw a live plot
    (default: in Jupyter, unless the budget is the grading one), i.e. add the view installed with
    :func:`set_live_view` (:class:`d2lite.plot.LivePlot`) to the callbacks. progress: a tqdm bar
    (default: as animate). verbose: print d2l's closing lines. callbacks: called with the History
    after every epoch, and their ``close()``, if any, once at the end.
    """
    if not isinstance(num_epochs, int) or num_epochs < 1:
        raise ValueError(f"num_epochs must be a positive int, got {num_epochs!r}")
    if not 0 < lr < float("inf"):
        raise ValueError(f"lr must be positive and finite, got {lr!r}")
    device = torch.device(device) if device is not None else try_gpu()
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # sigmoid nets at lr ~1 make denormals that slow CPUs ~5x
        keep_freed_memory()
    if init is not None:
        net.apply(init)
    net.to(device)
    opt = make_optimizer(optimizer, net.parameters(), lr)
    sched = scheduler(opt) if scheduler is not None else None
    loss_fn = loss if loss is not None else nn.CrossEntropyLoss()
    history = History(name=name, device=str(device))

    if animate is None:
        show = _animate_by_default is not None and _live_view is not None and _animate_by_default()
    else:
        show = bool(animate)
    callbacks = list(callbacks)
    if show:
        if _live_view is None:
            raise ValueError("animate=True needs a live view, and none is installed: "
                             "d2lite.train.set_live_view(d2lite.plot.LivePlot) installs the usual one")
        callbacks.append(_live_view(title=name or None, num_epochs=num_epochs))
    bar = _progress_bar(num_epochs * _num_batches(train_iter), show if progress is None else progress)

    diverged = False
    try:
        for epoch in range(1, num_epochs + 1):
            epoch_start = time.perf_counter()
            lr_now = opt.param_groups[0]["lr"]
            net.train()
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen, train_seconds = 0, 0.0
            for X, y in train_iter:
                step_start = time.perf_counter()
                X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                y_hat = net(X)
                batch_loss = loss_fn(y_hat, y)
                batch_loss.backward()
                opt.step()
                with torch.no_grad():
                    loss_sum += batch_loss.detach() * y.numel()
                    correct += accuracy(y_hat, y)
                seen += y.numel()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_seconds += time.perf_counter() - step_start
                if bar is not None:
                    bar.update(1)
            if seen == 0:
                raise ValueError("train_iter produced no batches")
            train_loss = loss_sum.item() / seen
            if train_loss != train_loss or abs(train_loss) == float("inf"):
                if verbose and not diverged:
                    print(f"epoch {epoch}: the training loss is {train_loss} — training diverged")
                diverged = True
            test_acc = evaluate_accuracy(net, test_iter, device)
            if sched is not None:
                sched.step()
            history.epochs.append(EpochStats(
                epoch=epoch, train_loss=train_loss, train_acc=correct.item() / seen, test_acc=test_acc,
                lr=lr_now, examples_per_sec=seen / train_seconds if train_seconds else 0.0,
                seconds=time.perf_counter() - epoch_start, num_examples=seen,
                train_seconds=train_seconds))
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", test_acc=f"{test_acc:.3f}")
            for callback in callbacks:
                callback(history)
    finally:
        if bar is not None:
            bar.close()
        for callback in callbacks:
            if hasattr(callback, "close"):
                callback.close()
    if verbose:
        print(history.summary())
    return history


_KEPT: bool | None = None  # None: not tried yet in this process


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    By default glibc hands every freed block over ~128 KiB-32 MiB back to the kernel, so each
    training step on the CPU pays page faults to get its activations' memory again: 1,800 faults
    and 4 ms of a 27 ms LeNet-BN step on this project's 2-core test machine. With this, memory
    freed by one step is reused by the next (the process keeps its peak size, which it reaches
    anyway). It is process-wide and cannot be undone. :func:`train` calls it on the CPU; it acts
    once per process and returns whether it applied: False off 64-bit glibc, where the user tuned
    malloc already (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``),
    or with ``D2LITE_KEEP_FREED_MEMORY=0``.
    """
    global _KEPT
    if _KEPT is None:
        _KEPT = _apply_mallopt()
    return _KEPT


def _apply_mallopt() -> bool:
    if (not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"
            or ctypes.sizeof(ctypes.c_void_p) != 8
            or os.environ.get("D2LITE_KEEP_FREED_MEMORY", "").strip().lower() in ("0", "false", "no")
            or any(v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                             "GLIBC_TUNABLES"))):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # False if either call is refused (the first may then have applied alone: no harm done)
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


def _device_of(net: nn.Module) -> torch.device:
    for tensor in net.parameters():
        return tensor.device
    for tensor in net.buffers():
        return tensor.device
    return torch.device("cpu")


def _num_batches(iterable) -> int:
    try:
        return len(iterable)
    except TypeError:
        return 0


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total or None, unit="batch", leave=False)
