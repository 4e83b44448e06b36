"""Helpers for the notebooks' test cells: comparisons whose failures teach, and gradient checks."""
from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = ["rel_error", "assert_close", "numerical_gradient", "check_gradients", "forbid_calls",
           "retained_memory", "resident_mib", "BATCH_NORM_LIBRARY_FUNCTIONS"]

# the library implementations a from-scratch batch norm must not call
BATCH_NORM_LIBRARY_FUNCTIONS = ("torch.nn.functional.batch_norm", "torch.batch_norm",
                                "torch.native_batch_norm", "torch.nn.functional.instance_norm",
                                "d2lite.batch_norm", "d2lite.functional.batch_norm")


def rel_error(x, y) -> float:
    """CS231n's relative error: max |x - y| / max(1e-8, |x| + |y|), elementwise."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    return ((x - y).abs() / (x.abs() + y.abs()).clamp_min(1e-8)).max().item()


def assert_close(actual, expected, what: str = "the result", *, rtol: float | None = None,
                 atol: float | None = None, hint: str | None = None) -> None:
    """Assert ``actual`` equals ``expected`` up to tolerance, with a message a student can act on.

    The message says what was checked, what was expected and what came (shape, dtype or values,
    with the worst element), and ``hint``: the mistake that most often causes the difference.
    Tolerances default to ``torch.testing.assert_close``'s for the dtype (float32: rtol 1.3e-6,
    atol 1e-5; float64: rtol 1e-7, atol 1e-7).
    """
    tip = f"\nHint: {hint}" if hint else ""
    if actual is None:
        raise AssertionError(f"{what}: expected a tensor, got None — did the function return "
                             f"its result?{tip}")
    actual_t = torch.as_tensor(actual)
    expected_t = torch.as_tensor(expected)
    if actual_t.shape != expected_t.shape:
        raise AssertionError(f"{what}: expected shape {tuple(expected_t.shape)}, got shape "
                             f"{tuple(actual_t.shape)}{tip}")
    if actual_t.dtype != expected_t.dtype and actual_t.is_floating_point() != expected_t.is_floating_point():
        raise AssertionError(f"{what}: expected dtype {expected_t.dtype}, got {actual_t.dtype}{tip}")
    actual_t = actual_t.detach().to(expected_t.dtype)
    expected_t = expected_t.detach().to(actual_t.device)
    try:
        torch.testing.assert_close(actual_t, expected_t, rtol=rtol, atol=atol, equal_nan=False)
    except AssertionError:
        diff = (actual_t - expected_t).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        worst = int(diff.flatten().argmax()) if diff.numel() else 0
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape)) if diff.dim() else ()
        raise AssertionError(
            f"{what}: expected {_fmt(expected_t)}, got {_fmt(actual_t)}\n"
            f"largest difference {diff.flatten()[worst].item():.3g} at index {index}: expected "
            f"{expected_t[index].item():.6g}, got {actual_t[index].item():.6g} "
            f"(relative error {rel_error(actual_t, expected_t):.2g}){tip}") from None


def _fmt(t: torch.Tensor) -> str:
    if t.numel() <= 6:
        return str([round(v, 6) for v in t.flatten().tolist()]) if t.is_floating_point() else str(t.tolist())
    return f"a tensor of shape {tuple(t.shape)} (mean {t.double().mean().item():.4g})"


def numerical_gradient(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       dout: torch.Tensor | None = None, h: float = 1e-6) -> torch.Tensor:
    """The gradient of ``sum(f(x) * dout)`` with respect to ``x`` by central differences.

    x: any shape (float64 recommended); dout: the shape of ``f(x)`` (default: ones).
    Costs two evaluations of ``f`` per element of ``x``: use small inputs.
    """
    x = x.detach().clone().to(torch.float64)
    with torch.no_grad():
        out = f(x)
        dout = torch.ones_like(out) if dout is None else dout.to(out.dtype)
        grad = torch.zeros_like(x)
        flat, gflat = x.view(-1), grad.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + h
            plus = (f(x) * dout).sum()
            flat[i] = old - h
            minus = (f(x) * dout).sum()
            flat[i] = old
            gflat[i] = (plus - minus) / (2 * h)
    return grad


def check_gradients(f: Callable[..., torch.Tensor], *inputs: torch.Tensor, names=None,
                    rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Compare autograd's gradients of ``f(*inputs)`` with numerical ones, input by input.

    inputs: float64 tensors (converted if not); a failure names the input whose gradient is off.
    """
    inputs = [t.detach().to(torch.float64).requires_grad_(True) for t in inputs]
    names = names or [f"input {i}" for i in range(len(inputs))]
    out = f(*inputs)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    for i, (name, t, g) in enumerate(zip(names, inputs, grads)):
        def f_i(x, i=i):
            args = [x if j == i else inputs[j].detach() for j in range(len(inputs))]
            return f(*args)
        expected = numerical_gradient(f_i, t, dout)
        if g is None:
            raise AssertionError(f"the gradient of {name}: autograd found none — is {name} used "
                                 "in the computation, or was it detached?")
        assert_close(g, expected, f"the gradient of {name}", rtol=rtol, atol=atol,
                     hint="compare your backward pass with the chain rule term by term")


@contextmanager
def forbid_calls(*names: str, namespace: dict | None = None) -> Iterator[None]:
    """Inside the block, calling any of the dotted ``names`` raises an AssertionError that names it.

    Used by structural tests: ``with forbid_calls(*BATCH_NORM_LIBRARY_FUNCTIONS): my_bn(X, ...)``
    proves the student's function does the work itself. Aliases in ``namespace`` (default: the
    notebook's ``__main__`` globals), as left by ``from torch.nn.functional import batch_norm``,
    are blocked too.
    """
    names = names or BATCH_NORM_LIBRARY_FUNCTIONS
    namespace = vars(sys.modules["__main__"]) if namespace is None else namespace
    patched: list[tuple[object, str, object]] = []

    def blocker(name):
        def blocked(*args, **kwargs):
            raise AssertionError(f"your code called {name}: implement the computation yourself "
                                 "with tensor operations (mean, var, sqrt, ...) instead")
        return blocked

    try:
        originals = {}
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = importlib.import_module(module_name)
            original = getattr(module, attr)
            originals[id(original)] = name
            patched.append((module, attr, original))
            setattr(module, attr, blocker(name))
        for key, value in list(namespace.items()):
            if id(value) in originals:
                patched.append((namespace, key, value))
                namespace[key] = blocker(originals[id(value)])
        yield
    finally:
        for target, attr, original in reversed(patched):
            if isinstance(target, dict):
                target[attr] = original
            else:
                setattr(target, attr, original)


def resident_mib(pid: int | str = "self") -> float:
    """The resident memory of process ``pid`` in MiB (Linux: /proc; elsewhere the peak, from getrusage)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20 if sys.platform == "darwin" else 1024)


def retained_memory(step: Callable, state, steps: int = 30, warmup: int = 5) -> float:
    """Run ``state = step(state)`` ``steps`` times; return the MiB of memory the process kept between
    step ``warmup`` and the last one. A running statistic that keeps its autograd graph keeps every
    step's saved tensors: the memory grows with the steps; a detached one stays flat.

    Under ``d2lite grade`` the memory is that of the student's process, read from outside it.
    """
    for _ in range(warmup):
        state = step(state)
    collect_garbage()
    before = resident_mib()
    for _ in range(steps - warmup):
        state = step(state)
    collect_garbage()
    return resident_mib() - before


def collect_garbage() -> None:
    """gc.collect() in the process whose memory retained_memory measures (under d2lite grade the
    student's, where nothing of the steps is cyclic: a no-op in the checker)."""
    import gc

    gc.collect()
