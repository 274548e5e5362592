"""The GPU kernels behind the models: the selective scan (three backends), the grid scan,
the fused depth-wise conv and the fused LayerNorms, each a package with a PyTorch
reference beside its kernels."""
from __future__ import annotations

import os

import torch


def load_triton(what: str):
    """``(triton, triton.language)`` for a kernel module; ``what`` names the kernels in the
    error. Raises ``ImportError`` without Triton, and without a CUDA GPU unless Triton's
    CPU interpreter is on (``TRITON_INTERPRET=1``, read by Triton at import too), which
    runs the kernels on CPU tensors for tests."""
    try:
        import triton  # noqa: PLC0415 - only where the kernels are wanted
        import triton.language as tl  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(f"{what} needs the 'triton' package ({exc})") from exc
    if not interpreting() and not torch.cuda.is_available():
        raise ImportError(f"{what} needs a CUDA GPU: torch.cuda.is_available() is False "
                          "(TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for testing)")
    return triton, tl


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
