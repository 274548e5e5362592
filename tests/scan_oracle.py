"""Test oracle: the selective scan written as the textbook loop over time.

Deliberately slow and literal (one Python iteration per step, channels
expanded explicitly) so that it is easy to check by eye. It runs in float64
by default and is differentiable through autograd, so it also provides the
reference gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _expand_groups(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``(batch, G, N, L)`` -> ``(batch, dim, N, L)``: channel d reads group d // (dim // G)."""
    group_of_channel = torch.arange(dim, device=x.device) // (dim // x.shape[1])
    return x[:, group_of_channel]


def sequential_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor, D: Optional[torch.Tensor] = None,
                    delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Selective scan, one step at a time, computed in ``dtype``.

    Shapes: ``u, delta: (batch, D, L)``; ``A: (D, N)``; ``B, C: (batch, G, N, L)``;
    ``D, delta_bias: (D,)``. Returns ``y: (batch, D, L)`` in ``dtype``.
    """
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B = _expand_groups(B, dim)  # (batch, dim, N, L)
    C = _expand_groups(C, dim)

    h = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # (batch, dim, 1)
        h = torch.exp(dt * A) * h + dt * B[:, :, :, t] * u[:, :, t, None]
        ys.append((h * C[:, :, :, t]).sum(dim=-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    return y
