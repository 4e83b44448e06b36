"""Tolerances shared by the tests that hold d2lite against PyTorch.

float64: 1e-12 (atol times the largest |expected|) — the same formulas, differing only in the order of floating-point sums (ulps).
float32: rtol 1e-5, atol 2e-6 times the largest |expected| — summation order over up to ~10^4
elements moves float32 results by ~1e-6 relative, and a gradient is a difference of terms as
large as the largest one, so its rounding error is ulps of that, not of each element.
"""
import torch

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-6)}


def assert_matches(actual, expected, dtype, msg=None):
    """torch.testing.assert_close with TOL[dtype], the absolute part scaled by max |expected|."""
    tol = dict(TOL[dtype])
    tol["atol"] *= expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, **tol, msg=msg)
