"""CUDA-extension backend of the selective scan (``groupmamba_scan_cuda``).

Build it once with ``pip install --no-build-isolation ./kernels/selective_scan``.
Importing this module raises ``ImportError`` with the reason when the extension is
not built or no CUDA device is present; the dispatcher records that and falls back.

The extension takes u, delta, B, C in one dtype among float32, float16 and
bfloat16 and A, D, delta_bias in float32, and computes and returns y (and takes
its gradient dy) in float32; this wrapper casts mixed inputs (to float32) and
returns y in :func:`output_dtype` and the gradients in the dtypes of the
original arguments.
Supports N (d_state) up to 32; use the Triton backend for larger N.
"""
from typing import Optional

import torch

from ._ops import define_scan_op, output_dtype

try:
    import groupmamba_scan_cuda as _ext
except ImportError as exc:
    raise ImportError(
        f"the CUDA scan extension 'groupmamba_scan_cuda' is not built or does not load ({exc}); "
        "build it with: pip install --no-build-isolation ./kernels/selective_scan") from exc

if not torch.cuda.is_available():
    raise ImportError("the CUDA scan backend needs a CUDA GPU, and torch.cuda.is_available() is False")

__all__ = ["selective_scan_cuda", "MAX_STATE"]

MAX_STATE = 32
_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _io_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The one dtype the kernels read u, delta, B, C in."""
    first = tensors[0].dtype
    if first in _IO_DTYPES and all(t.dtype == first for t in tensors):
        return first
    return torch.float32


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _io(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous()


def _fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, items: int = 0, row_warps: int = 0):
    """Forward; ``items`` (steps per thread per chunk) and ``row_warps`` (warps per row)
    override the launch choice (0: automatic)."""
    io = _io_dtype(u, delta, B, C)
    y = _ext.fwd(_io(u, io), _io(delta, io), _f32(A), _io(B, io), _io(C, io), _f32(D),
                 _f32(delta_bias), bool(delta_softplus), items, row_warps)
    return y.to(output_dtype(u, delta, A, B, C, D, delta_bias))  # float64 in, float64 out


def _bwd(dout, u, delta, A, B, C, D, delta_bias, delta_softplus, items: int = 0):
    io = _io_dtype(u, delta, B, C)
    du, ddelta, dA, dB, dC, dD, dbias = _ext.bwd(
        _f32(dout), _io(u, io), _io(delta, io), _f32(A), _io(B, io), _io(C, io), _f32(D),
        _f32(delta_bias), bool(delta_softplus), items)

    def cast(g: torch.Tensor, like: Optional[torch.Tensor]) -> torch.Tensor:
        return g if like is None or g.dtype == like.dtype else g.to(like.dtype)

    return (cast(du, u), cast(ddelta, delta), cast(dA, A), cast(dB, B), cast(dC, C),
            cast(dD, D), cast(dbias, delta_bias))


selective_scan_cuda = define_scan_op("cuda", _fwd, _bwd, device_types="cuda")
