"""torch.library custom-op plumbing shared by the compiled scan backends.

Each GPU backend (Triton, CUDA extension) supplies two plain functions,

    fwd(u, delta, A, B, C, D, delta_bias, delta_softplus) -> y
    bwd(dy, u, delta, A, B, C, D, delta_bias, delta_softplus)
        -> (du, ddelta, dA, dB, dC, dD, ddelta_bias)

and :func:`define_scan_op` wraps them as two custom ops
``groupmamba_scan::<name>_fwd`` / ``<name>_bwd`` with fake (meta) kernels and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces straight through a
scan without a graph break and AOTAutograd sees the backward as one opaque op.

Conventions of the ops (the fake kernels promise exactly this):

- every output is a fresh contiguous tensor;
- ``y`` has ``u``'s shape and the dtype the math runs in (:func:`output_dtype`:
  float32, or float64 when an input is float64), also for half-precision inputs:
  GroupMamba normalises it in float32 next, and a half ``y`` would round it first;
  ``dout`` (the gradient of ``y``) comes in that dtype;
- ``du``, ``ddelta``, ``dA``, ``dB``, ``dC`` have the shape and dtype of
  ``u``, ``delta``, ``A``, ``B``, ``C``;
- ``dD`` / ``ddelta_bias`` have D's / delta_bias's shape and dtype, or are empty
  float32 tensors of shape ``(0,)`` when that argument is None (custom ops cannot
  return None).

This file also holds :func:`scan_fwd_explicit` / :func:`scan_bwd_explicit`, a
loop-over-L PyTorch transcription of the exact gradient formulas the kernels
implement. They are slow and meant for small CPU tests: of those formulas, and of
the op machinery itself on machines without a GPU.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["NAMESPACE", "define_scan_op", "output_dtype", "scan_fwd_explicit", "scan_bwd_explicit"]

NAMESPACE = "groupmamba_scan"

_ARGS = ("Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
         "Tensor? delta_bias, bool delta_softplus")
_FWD_SCHEMA = f"({_ARGS}) -> Tensor"
_BWD_SCHEMA = f"(Tensor dout, {_ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"


def output_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of ``y`` and of the math: float32, or float64 if any input is float64."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _empty_like_contig(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _opt_grad_like(t: Optional[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    if t is None:
        return torch.empty((0,), dtype=torch.float32, device=ref.device)
    return _empty_like_contig(t)


def _per_channel(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.repeat_interleave(dim // x.shape[1], dim=1).contiguous()


def _group_sum(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, dim = x.shape[:2]
    return x.view(batch, groups, dim // groups, *x.shape[2:]).sum(2)


def define_scan_op(name: str, fwd_impl: Callable, bwd_impl: Callable,
                   device_types=None) -> Callable:
    """Register ``NAMESPACE::{name}_fwd`` and ``_bwd``; return a differentiable callable.

    ``fwd_impl`` / ``bwd_impl`` follow the conventions in the module docstring.
    The returned function has the backend signature
    ``f(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False)``.
    """
    fwd_name = f"{NAMESPACE}::{name}_fwd"
    bwd_name = f"{NAMESPACE}::{name}_bwd"

    def _fwd(u, delta, A, B, C, D, delta_bias, delta_softplus):
        if B.shape[1] != C.shape[1]:
            B, C = _per_channel(B, u.shape[1]), _per_channel(C, u.shape[1])
        return fwd_impl(u, delta, A, B, C, D, delta_bias, delta_softplus)

    def _bwd(dout, u, delta, A, B, C, D, delta_bias, delta_softplus):
        if B.shape[1] == C.shape[1]:
            return tuple(bwd_impl(dout, u, delta, A, B, C, D, delta_bias, delta_softplus))
        # B and C grouped differently: run per channel, then sum back to each grouping
        dim = u.shape[1]
        grads = list(bwd_impl(dout, u, delta, A, _per_channel(B, dim), _per_channel(C, dim), D,
                              delta_bias, delta_softplus))
        grads[3] = _group_sum(grads[3], B.shape[1])
        grads[4] = _group_sum(grads[4], C.shape[1])
        return tuple(grads)

    fwd_op = torch.library.custom_op(fwd_name, _fwd, mutates_args=(), device_types=device_types,
                                     schema=_FWD_SCHEMA)
    bwd_op = torch.library.custom_op(bwd_name, _bwd, mutates_args=(), device_types=device_types,
                                     schema=_BWD_SCHEMA)

    @fwd_op.register_fake
    def _fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus):
        return torch.empty(u.shape, dtype=output_dtype(u, delta, A, B, C, D, delta_bias), device=u.device)

    @bwd_op.register_fake
    def _bwd_fake(dout, u, delta, A, B, C, D, delta_bias, delta_softplus):
        return (_empty_like_contig(u), _empty_like_contig(delta), _empty_like_contig(A),
                _empty_like_contig(B), _empty_like_contig(C), _opt_grad_like(D, u),
                _opt_grad_like(delta_bias, u))

    def _setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        ctx.has_D = D is not None
        ctx.has_bias = delta_bias is not None

    def _backward(ctx, dout):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias = bwd_op(dout, u, delta, A, B, C, D, delta_bias,
                                                   ctx.delta_softplus)
        return (du, ddelta, dA, dB, dC, dD if ctx.has_D else None,
                dbias if ctx.has_bias else None, None)

    fwd_op.register_autograd(_backward, setup_context=_setup_context)

    class _EagerScan(torch.autograd.Function):
        """The same forward/backward without the custom-op dispatch (eager mode only)."""

        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
            ctx.delta_softplus = delta_softplus
            ctx.has_D = D is not None
            ctx.has_bias = delta_bias is not None
            return _fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, dout):
            u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
            du, ddelta, dA, dB, dC, dD, dbias = _bwd(dout.contiguous(), u, delta, A, B, C, D,
                                                     delta_bias, ctx.delta_softplus)
            return (du, ddelta, dA, dB, dC, dD if ctx.has_D else None,
                    dbias if ctx.has_bias else None, None)

    def scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
        # torch.compile / export trace the custom op (fake kernel, registered backward);
        # eager calls skip the op dispatcher, which costs tens of microseconds a call
        if torch.compiler.is_compiling():
            return fwd_op(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, D, delta_bias)):
            return _EagerScan.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
        return _fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))

    scan.fwd_op = fwd_op
    scan.bwd_op = bwd_op
    scan.__name__ = f"selective_scan_{name}"
    scan.__doc__ = (f"Selective scan through the custom op ``{fwd_name}`` "
                    f"(backward: ``{bwd_name}``); see kernels.selective_scan.selective_scan_fn.")
    return scan


# ----------------------------------------------------------------------------------
# explicit-gradient PyTorch transcription (small CPU tests; the kernels' spec)
# ----------------------------------------------------------------------------------

def _explicit_setup(u, delta, A, B, C, delta_bias, delta_softplus):
    dtype = output_dtype(u, delta, A, B, C)
    dim = u.shape[1]
    x = delta.to(dtype)
    if delta_bias is not None:
        x = x + delta_bias.to(dtype)[:, None]
    dt = F.softplus(x) if delta_softplus else x
    rep = dim // B.shape[1]
    Bc = B.to(dtype).repeat_interleave(rep, dim=1)  # (batch, dim, N, L)
    Cc = C.to(dtype).repeat_interleave(rep, dim=1)
    Af = A.to(dtype)
    dA = torch.exp(dt[:, :, None, :] * Af[None, :, :, None])  # (batch, dim, N, L)
    bx = dt[:, :, None, :] * Bc * u.to(dtype)[:, :, None, :]
    return dtype, x, dt, Bc, Cc, Af, dA, bx


def scan_fwd_explicit(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Forward by a plain loop over L (float32 math and ``y``, float64 if an input is float64)."""
    dtype, _, _, _, Cc, _, dA, bx = _explicit_setup(u, delta, A, B, C, delta_bias, delta_softplus)
    h = torch.zeros(dA.shape[:3], dtype=dtype, device=u.device)
    ys = []
    for t in range(u.shape[2]):
        h = dA[..., t] * h + bx[..., t]
        ys.append((Cc[..., t] * h).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    return y


def scan_bwd_explicit(dout, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """All seven gradients from the closed-form adjoint recurrence.

    With ``g_t = dLoss/dh_t = C_t * dy_t + exp(dt_{t+1} A) * g_{t+1}`` (a reverse scan):

    - ``du_t = D dy_t + sum_n g_t dt_t B_t``
    - ``d(dt)_t = sum_n g_t (B_t u_t + A exp(dt_t A) h_{t-1})``, then through
      softplus (times ``sigmoid(delta + bias)``) to ``ddelta`` and ``ddelta_bias``
    - ``dA = sum_{b,t} g_t dt_t exp(dt_t A) h_{t-1}``
    - ``dB_t = sum_{channels of the group} g_t dt_t u_t``; ``dC_t = sum dy_t h_t``
    - ``dD = sum_{b,t} dy_t u_t``

    The kernels use ``exp(dt_t A) h_{t-1} = h_t - dt_t B_t u_t`` so they never need
    the shifted state; this transcription uses ``h_{t-1}`` directly.
    """
    dtype, x, dt, Bc, Cc, Af, dA, bx = _explicit_setup(u, delta, A, B, C, delta_bias,
                                                        delta_softplus)
    batch, dim, length = u.shape
    groups = B.shape[1]
    uf = u.to(dtype)
    dy = dout.to(dtype)
    hs = []
    h = torch.zeros(dA.shape[:3], dtype=dtype, device=u.device)
    for t in range(length):
        h = dA[..., t] * h + bx[..., t]
        hs.append(h)
    H = torch.stack(hs, dim=-1)  # (batch, dim, N, L)
    H_prev = F.pad(H[..., :-1], (1, 0))
    gs = [None] * length
    g = torch.zeros_like(h)
    for t in reversed(range(length)):
        nxt = dA[..., t + 1] * g if t + 1 < length else 0.0
        g = Cc[..., t] * dy[:, :, None, t] + nxt
        gs[t] = g
    Gm = torch.stack(gs, dim=-1)
    ddt = (Gm * (Bc * uf[:, :, None] + Af[None, :, :, None] * dA * H_prev)).sum(2)
    du = (Gm * dt[:, :, None] * Bc).sum(2)
    if D is not None:
        du = du + D.to(dtype)[:, None] * dy
    dA_grad = (Gm * dt[:, :, None] * dA * H_prev).sum((0, 3))
    dBc = Gm * dt[:, :, None] * uf[:, :, None]
    dCc = dy[:, :, None] * H
    dB = dBc.view(batch, groups, dim // groups, *dBc.shape[2:]).sum(2)
    dC = dCc.view(batch, groups, dim // groups, *dCc.shape[2:]).sum(2)
    ddelta = ddt * torch.sigmoid(x) if delta_softplus else ddt
    dD = (dy * uf).sum((0, 2)).to(D.dtype) if D is not None else _opt_grad_like(None, u)
    dbias = (ddelta.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None
             else _opt_grad_like(None, u))
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA_grad.to(A.dtype), dB.to(B.dtype),
            dC.to(C.dtype), dD, dbias)
