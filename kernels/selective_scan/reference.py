"""Pure-PyTorch selective scan: the reference backend, CPU or GPU.

The S6 recurrence, per batch ``b``, channel ``d``, state ``n`` and step ``t``::

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n]  (+ D[d] * u_t)

is a first-order linear recurrence ``h_t = a_t * h_{t-1} + b_t`` with decay
``a_t = exp(delta_t * A) in (0, 1]`` (for ``delta >= 0``, ``A <= 0``).

How it is evaluated, and why:

- No Python loop over L. The recurrence is solved by an odd/even (cyclic)
  reduction: adjacent steps are fused pairwise, ``(a1 * a0, a1 * b0 + b1)``,
  the half-length problem is solved recursively, and the even steps are
  filled in from their odd neighbours. That is ``ceil(log2 L)`` levels of
  whole-tensor ops and about ``2 L`` multiply-adds in total.
- Stable for any ``delta >= 0`` and ``A < 0``: only products of decays in
  ``(0, 1]`` are ever formed, so nothing can overflow; a cumulative sum of
  ``delta * A`` is never exponentiated (neither ``exp(+cumsum)`` nor a
  difference of cumsums).
- Faster than a chunked segment-sum (``exp(cs_t - cs_k)`` decay matrix) on
  CPU: on the GroupMamba shapes (N = 1) the chunked form spends ``T``
  exponentials per element and measured 15-100x slower for T in 16..128.
- The backward of a linear recurrence is the same recurrence run backwards,
  so :class:`_LinearScan` has a hand-written backward (one reverse scan) and
  saves only ``a`` and ``h``; everything around it uses autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._ops import output_dtype

__all__ = ["linear_scan", "selective_scan_ref"]


def _scan_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``h_t = a_t * h_{t-1} + b_t`` with ``h_{-1} = 0`` along the last dim.

    a, b: ``(..., L)`` of one shape and dtype. Returns h: ``(..., L)``.
    Built from new tensors only (no writes into views), so tracers and exporters
    (torch.export, the ONNX exporters) capture it exactly; gradients come from
    :class:`_LinearScan`'s backward, which is cheaper than autograd through the levels.
    """
    length = a.shape[-1]
    if length <= 1:
        return b.clone()
    pairs = length // 2
    a_even, a_odd = a[..., 0:2 * pairs:2], a[..., 1:2 * pairs:2]
    b_even, b_odd = b[..., 0:2 * pairs:2], b[..., 1:2 * pairs:2]
    # steps 2i and 2i+1 composed into one step that ends at 2i+1
    h_odd = _scan_forward(a_odd * a_even, torch.addcmul(b_odd, a_odd, b_even))
    # even steps from their odd predecessor: h_0 = b_0, h_{2i} = a_{2i} * h_{2i-1} + b_{2i}
    h_even = torch.cat([b[..., :1], torch.addcmul(b[..., 2::2], a[..., 2::2], h_odd[..., :(length - 1) // 2])],
                       dim=-1)
    # interleaved back: h_0, h_1, h_2, ... (and the last even step of an odd length)
    h = torch.stack([h_even[..., :pairs], h_odd], dim=-1).flatten(-2)
    return torch.cat([h, h_even[..., pairs:]], dim=-1) if length % 2 else h


class _LinearScan(torch.autograd.Function):
    """``h = scan(a, b)``; the backward is a reverse scan of the same kind.

    With ``g_t = dLoss/dh_t`` accumulated through the recurrence,
    ``g_t = grad_h_t + a_{t+1} * g_{t+1}``, ``grad_b = g`` and
    ``grad_a_t = g_t * h_{t-1}``.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = _scan_forward(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        a, h = ctx.saved_tensors
        if a.shape[-1] == 0:
            return torch.zeros_like(a), torch.zeros_like(h)
        # reverse scan with coefficient a_{t+1} at step t; the last one is unused
        a_next = F.pad(a[..., 1:], (0, 1))
        g = linear_scan(a_next.flip(-1), grad_h.flip(-1)).flip(-1)
        h_prev = F.pad(h[..., :-1], (1, 0))
        return g * h_prev, g


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable ``h_t = a_t * h_{t-1} + b_t`` (``h_{-1} = 0``) along the last dim.

    a, b: ``(..., L)``, broadcastable to one shape. Returns h of the broadcast shape.
    Stable whenever ``|a| <= 1``.
    """
    a, b = torch.broadcast_tensors(a, b)
    return _LinearScan.apply(a.contiguous(), b.contiguous())


def _per_channel(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Repeat groups to channels: ``(batch, G, N, L)`` -> ``(batch, dim, N, L)``."""
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                       B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                       delta_bias: Optional[torch.Tensor] = None,
                       delta_softplus: bool = False) -> torch.Tensor:
    """Selective scan in plain PyTorch, differentiable in every tensor argument.

    Shapes: ``u, delta: (batch, D, L)``; ``A: (D, N)``; ``B, C: (batch, G, N, L)``
    with G dividing D (channel ``d`` reads group ``d // (D // G)``);
    ``D, delta_bias: (D,)``. Shapes are validated by ``selective_scan_fn``.

    Math runs in float32 (float64 if an input is float64, so float64 checks stay
    exact); returns ``y: (batch, D, L)`` in that dtype, also for half inputs.
    """
    dtype = output_dtype(u, delta, A, B, C, D, delta_bias)
    batch, dim, length = u.shape
    n_state = A.shape[1]
    if B.shape[1] != C.shape[1]:
        # different groupings for B and C: fall back to one group per channel
        B, C = _per_channel(B, dim), _per_channel(C, dim)
    groups = B.shape[1]
    per_group = dim // groups

    u = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    # work in (batch, G, D/G, N, L) so B and C broadcast over a group's channels
    u_g = u.view(batch, groups, per_group, 1, length)
    delta_g = delta.view(batch, groups, per_group, 1, length)
    A_g = A.to(dtype).view(1, groups, per_group, n_state, 1)
    B_g = B.to(dtype).unsqueeze(2)  # (batch, G, 1, N, L)
    C_g = C.to(dtype).unsqueeze(2)

    decay = torch.exp(delta_g * A_g)
    drive = (delta_g * u_g) * B_g
    h = linear_scan(decay, drive)  # (batch, G, D/G, N, L)
    if n_state == 1:
        y = (h * C_g).squeeze(3)  # skip a reduction over a size-1 dim
    else:
        y = (h * C_g).sum(dim=3)
    y = y.reshape(batch, dim, length)
    if D is not None:
        y = torch.addcmul(y, D.to(dtype)[:, None], u)
    return y
