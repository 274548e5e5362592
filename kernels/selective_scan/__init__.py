"""Selective scan (the S6 recurrence of Mamba) behind one interface, three backends.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = C_t . h_t + D * u_t

Backends share one signature (see :func:`selective_scan_fn`):

- ``"torch"``: pure PyTorch reference, CPU or GPU, autograd gradients.
- ``"triton"``: Triton kernels, no build step, CUDA tensors only.
- ``"cuda"``: compiled extension, ``pip install ./kernels/selective_scan``.

``backend="auto"`` picks the CUDA extension, then Triton (for CUDA tensors), then
the reference. The choice is the caller's: nothing here reads the environment.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Optional

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "resolve_backend",
    "selective_scan_fn",
]

BACKENDS = ("torch", "triton", "cuda")

# module, function name and the command that makes the backend importable
_BACKEND_SOURCES = {
    "torch": ("kernels.selective_scan.reference", "selective_scan_ref", None),
    "triton": ("kernels.selective_scan.triton_scan", "selective_scan_triton",
               "pip install 'triton>=3.0' (ships with CUDA builds of torch on Linux)"),
    "cuda": ("kernels.selective_scan.cuda_scan", "selective_scan_cuda",
             "pip install --no-build-isolation ./kernels/selective_scan"),
}


class BackendUnavailableError(RuntimeError):
    """A scan backend was requested explicitly but cannot run here."""


_loaded: dict[str, Callable] = {}
_load_errors: dict[str, str] = {}
_warned_fallback = False


def _load(name: str) -> Optional[Callable]:
    """Import a backend once; remember why it failed so errors can say so."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    module_name, fn_name, _ = _BACKEND_SOURCES[name]
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except Exception as exc:  # ImportError, or a broken build raising OSError etc.
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = fn
    return fn


def available_backends() -> dict[str, Optional[str]]:
    """Map each backend to None when importable, else the reason it is not."""
    return {name: (None if _load(name) else _load_errors.get(name)) for name in BACKENDS}


def _unavailable(name: str, why: str, fix: Optional[str] = None) -> BackendUnavailableError:
    fix = fix or _BACKEND_SOURCES[name][2]
    hint = f" Fix: {fix}" if fix else ""
    return BackendUnavailableError(f"selective-scan backend '{name}' is unavailable ({why}).{hint}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` (``auto`` or a name) into the name of a backend that can run."""
    global _warned_fallback
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for name in ("cuda", "triton"):
            if _load(name) is not None:
                return name
        if not _warned_fallback:
            _warned_fallback = True
            missing = "; ".join(f"{n}: {_load_errors.get(n)}" for n in ("cuda", "triton"))
            warnings.warn(
                f"no GPU selective-scan backend is available ({missing}); using the "
                "pure-PyTorch reference, which is correct but slower", RuntimeWarning, stacklevel=3)
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}: expected auto, {', '.join(BACKENDS)}")
    if _load(backend) is None:
        raise _unavailable(backend, _load_errors.get(backend, "not importable"))
    if backend != "torch" and device.type != "cuda":
        # installed fine, so reinstalling would not help: say what would
        raise _unavailable(backend, f"it needs CUDA tensors, got {device.type}",
                           fix="move the tensors to a CUDA device, or pass backend='torch'")
    return backend


def _check_shapes(u, delta, A, B, C, D, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must match u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D={dim}, N), got {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n_state or t.shape[3] != length:
            raise ValueError(f"{name} must be (batch={batch}, G, N={n_state}, L={length}), got {tuple(t.shape)}")
        if t.shape[1] == 0 or dim % t.shape[1] != 0:
            raise ValueError(f"{name} has G={t.shape[1]} groups, which must divide D={dim}")
    if B.shape[1] != C.shape[1]:
        # the compiled kernels index B and C with one group count
        raise ValueError(f"B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(t.shape)}")


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: Optional[torch.Tensor] = None,
                      delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                      backend: str = "auto") -> torch.Tensor:
    """Run the selective scan.

    Shapes: ``u, delta: (batch, D, L)``; ``A: (D, N)``; ``B, C: (batch, G, N, L)``
    with G dividing D (channel ``d`` uses group ``d // (D // G)``); ``D, delta_bias: (D,)``.
    Math is float32 whatever the input dtype (float64 if an input is float64), and
    ``y: (batch, D, L)`` comes back in that dtype: half-precision ``u``, ``delta``,
    ``B``, ``C`` are read as they are (half the bytes of a float32 copy, the same
    values), while ``y`` is not rounded to half. Gradients have their inputs' dtypes.
    """
    _check_shapes(u, delta, A, B, C, D, delta_bias)
    name = resolve_backend(backend, u.device)
    return _load(name)(u, delta, A, B, C, D, delta_bias, delta_softplus)
