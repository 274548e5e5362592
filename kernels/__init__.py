"""The GPU kernels behind the models: the selective scan (three backends), the grid scan,
the fused depth-wise conv and the fused LayerNorms, each a package with a PyTorch
reference beside its kernels."""
from __future__ import annotations

import importlib.util
import os

import torch

# whether Triton is installed (a module constant, so compiled code reads it without a
# guard on anything but this module)
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton's CPU interpreter (TRITON_INTERPRET=1, which Triton reads at import too): its
# kernels then run on CPU tensors, slowly, for tests
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``: a CUDA tensor, or any tensor under
    Triton's CPU interpreter."""
    return HAS_TRITON and (t.is_cuda or INTERPRETING)


def load_triton(what: str):
    """``(triton, triton.language)`` for a kernel module; ``what`` names the kernels in the
    error. Raises ``ImportError`` without Triton, and without a CUDA GPU unless Triton's
    CPU interpreter is on."""
    try:
        import triton  # noqa: PLC0415 - only where the kernels are wanted
        import triton.language as tl  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(f"{what} needs the 'triton' package ({exc})") from exc
    if not INTERPRETING and not torch.cuda.is_available():
        raise ImportError(f"{what} needs a CUDA GPU: torch.cuda.is_available() is False "
                          "(TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for testing)")
    return triton, tl
