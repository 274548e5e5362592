"""Triton device functions shared by the scan kernels (``triton_scan``, ``kernels.grid_scan``).

Importing this module needs the ``triton`` package (not a GPU).
"""
import triton
import triton.language as tl

__all__ = ["lin_combine", "softplus"]


@triton.jit
def lin_combine(a1, b1, a2, b2):
    """The linear-recurrence monoid for ``tl.associative_scan``: compose ``x -> a1 x + b1``,
    then ``x -> a2 x + b2``."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def softplus(x):
    """``log(1 + exp(x))`` without overflow, and without losing ``exp(x)`` for ``x << 0``."""
    e = tl.exp(-tl.abs(x))
    tail = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.maximum(x, 0.0) + tail
