"""Scan orders over a 2-D feature map, and the selective-scan entry point.

GroupMamba splits the channels of a block into four groups and lets each group
read the image in its own order:

====================  ====================================================
``"row"``             row-major: left to right, top to bottom
``"col"``             column-major: top to bottom, left to right
``"row_reversed"``    the row-major sequence read backwards
``"col_reversed"``    the column-major sequence read backwards
====================  ====================================================

:func:`to_sequence` turns a ``(B, C, H, W)`` map into ``(B, C, L)`` sequences in
one of these orders and :func:`from_sequence` puts a sequence back on the grid.
Both are plain tensor ops, so autograd derives their backward passes; that keeps
them correct for non-square maps (``H != W``) as well.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.selective_scan import selective_scan_fn

__all__ = ["SCAN_DIRECTIONS", "check_direction", "to_sequence", "from_sequence", "selective_scan"]

# The order matters: group k of a GroupMambaLayer (``mamba_g{k+1}``) scans in
# SCAN_DIRECTIONS[k], as in the released models.
SCAN_DIRECTIONS = ("row", "col", "row_reversed", "col_reversed")


def check_direction(direction: str) -> str:
    if direction not in SCAN_DIRECTIONS:
        raise ValueError(f"unknown scan direction {direction!r}: expected one of {', '.join(SCAN_DIRECTIONS)}")
    return direction


def _is_column_major(direction: str) -> bool:
    return direction.startswith("col")


def _is_reversed(direction: str) -> bool:
    return direction.endswith("_reversed")


def to_sequence(x: torch.Tensor, direction: str) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, H * W)`` read in ``direction``.

    Row-major order of a contiguous map is a free view; the other orders copy once
    (column-major reversed twice: transpose, then flip).
    """
    if _is_column_major(direction):
        x = x.transpose(2, 3)
    sequence = x.flatten(2)
    if _is_reversed(direction):
        sequence = sequence.flip(-1)
    return sequence


def from_sequence(y: torch.Tensor, direction: str, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_sequence`: ``(B, C, L)`` -> ``(B, C, H, W)``.

    The result may be a non-contiguous view; callers that change the layout
    anyway (the SS2D output norm works channels-last) then copy only once.
    """
    if _is_reversed(direction):
        y = y.flip(-1)
    batch, channels, _ = y.shape
    if _is_column_major(direction):
        return y.view(batch, channels, width, height).transpose(2, 3)
    return y.view(batch, channels, height, width)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                   delta_softplus: bool = True, backend: str = "auto") -> torch.Tensor:
    """The selective scan as GroupMamba calls it: float32 math and output.

    The released models run the scan in float32 even under mixed precision
    (the scan's exponentials and long products are what loses precision in
    half). Every backend computes in float32 and returns a float32 ``y``
    whatever the dtype of ``u``, ``delta``, ``B`` and ``C``, so half-precision
    activations go in as they are: the same values as a float32 copy, but half
    the bytes to write, read and keep for the backward. The parameters ``A``,
    ``D`` and ``delta_bias`` are cast here; float64 stays float64 so
    double-precision checks remain exact.

    Shapes: ``u, delta: (batch, D, L)``; ``A: (D, N)``; ``B, C: (batch, G, N, L)``;
    ``D, delta_bias: (D,)``. Returns ``(batch, D, L)`` in float32 (or float64).
    """
    def fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))

    return selective_scan_fn(u, delta, fp32(A), B, C, fp32(D), fp32(delta_bias),
                             delta_softplus, backend=backend)
