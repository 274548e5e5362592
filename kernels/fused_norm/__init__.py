"""GroupMamba's LayerNorms fused with the elementwise work around them, for CUDA tensors.

- :func:`modulated_layer_norm`, the end of a ``GroupMambaLayer`` before its projection::

      out = layer_norm(mixed * skip_scale * grid * gate, weight, bias, eps)

  with ``mixed`` and ``grid`` ``(B, N, C)``, ``gate`` ``(B, 1, C)`` (one value per image
  and channel) and ``skip_scale`` ``(1,)``;
- :func:`gated_group_norm`, the end of the grouped SS2D pipeline before ``out_proj``::

      out[..., g, :] = (layer_norm(ys[..., g, :], eps) * weight[g] + bias[g]) * silu(z[..., g, :])

  with ``ys`` ``(..., G, D)`` (the scan's float32 output), ``z`` ``(..., G * D)`` (the
  gate half of ``in_proj``) and a ``(G, D)`` affine per group;
- :func:`pooled_layer_norm`, the start of a ``GroupMambaLayer``: its LayerNorm and the
  mean token its channel-affinity gate reads, both returned::

      out = layer_norm(x, weight, bias, eps);  pooled = out.mean(1, keepdim=True)

- :func:`residual_layer_norm`, a block's residual sum and the LayerNorm of its
  feed-forward, both returned::

      total = x + branch * keep;  out = layer_norm(total, weight, bias, eps)

  with ``keep`` ``(B,)`` (stochastic depth's factor per image) or None.

Unfused, each is four or five passes over the activations, most in float32, and autograd
keeps their intermediate results for the backward pass; as differentiable custom ops
they are one pass each way, and the backward recomputes the products and statistics
from the inputs it already keeps.

Numerics are those of the unfused ops computed in float32 and rounded once: the
modulated norm's output is written in ``out_dtype`` (under autocast the dtype the
projection casts it to anyway), the gated norm's in ``z``'s dtype, the residual norm's sum
in the dtype of ``x + branch`` and its norm in ``out_dtype``, the pooled norm's two
outputs in ``out_dtype``; input gradients come in their inputs' dtypes. The kernels are
in :mod:`.triton_norm` (imported at the first call, so CPU-only machines never need
Triton); the ``*_reference`` functions are the same computations in plain PyTorch ops.

``torch.compile`` traces the op (fake kernels, registered backward) without a graph
break, and CUDA graphs can capture it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels import HAS_TRITON  # re-exported: whether Triton is installed

__all__ = ["HAS_TRITON", "gated_group_norm", "gated_group_norm_reference", "modulated_layer_norm",
           "modulated_layer_norm_reference", "pooled_layer_norm", "pooled_layer_norm_reference",
           "residual_layer_norm", "residual_layer_norm_reference"]


_MODULATED = "groupmamba_norm::modulated_layer_norm"
_GATED = "groupmamba_norm::gated_group_norm"
_POOLED = "groupmamba_norm::pooled_layer_norm"
_RESIDUAL = "groupmamba_norm::residual_layer_norm"


def _kernels():
    from . import triton_norm  # noqa: PLC0415 - needs Triton and a GPU (or its interpreter)
    return triton_norm


def _check_affine(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], shape: tuple) -> None:
    """A LayerNorm's weight and bias must both be there, of ``shape``."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {None if t is None else tuple(t.shape)}")


# --------------------------------------------------------------------------- modulated norm

@torch.library.custom_op(_MODULATED, mutates_args=())
def _modulated_forward(mixed: torch.Tensor, skip_scale: torch.Tensor, grid: torch.Tensor, gate: torch.Tensor,
                   weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return _kernels().modulated_norm_fwd(mixed, grid, gate, skip_scale, weight, bias, eps, out_dtype)


@_modulated_forward.register_fake
def _(mixed, skip_scale, grid, gate, weight, bias, eps, out_dtype):
    return mixed.new_empty(mixed.shape, dtype=out_dtype)


@torch.library.custom_op(_MODULATED + "_backward", mutates_args=())
def _modulated_backward(dout: torch.Tensor, mixed: torch.Tensor, skip_scale: torch.Tensor, grid: torch.Tensor,
                    gate: torch.Tensor, weight: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dmixed, dgrid, dgate, dscale, dweight, dbias = _kernels().modulated_norm_bwd(
        dout, mixed, grid, gate, skip_scale, weight, eps)
    return (dmixed, dscale.to(skip_scale.dtype), dgrid, dgate.view_as(gate).to(gate.dtype), dweight.to(weight.dtype),
            dbias.to(weight.dtype))


@_modulated_backward.register_fake
def _(dout, mixed, skip_scale, grid, gate, weight, eps):
    return (torch.empty_like(mixed), torch.empty_like(skip_scale), torch.empty_like(grid),
            torch.empty_like(gate), torch.empty_like(weight), torch.empty_like(weight))


def _modulated_setup_context(ctx, inputs, output):
    mixed, skip_scale, grid, gate, weight, bias, eps, out_dtype = inputs
    ctx.eps = eps
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(mixed, skip_scale, grid, gate, weight)


def _modulated_backward_rule(ctx, dout):
    mixed, skip_scale, grid, gate, weight = ctx.saved_tensors
    dmixed, dscale, dgrid, dgate, dweight, dbias = _modulated_backward(
        dout.contiguous(), mixed, skip_scale, grid, gate, weight, ctx.eps)
    return dmixed, dscale, dgrid, dgate, dweight, dbias.to(ctx.bias_dtype), None, None


_modulated_forward.register_autograd(_modulated_backward_rule, setup_context=_modulated_setup_context)


def _check_modulated_arguments(mixed, skip_scale, grid, gate, weight, bias) -> None:
    if mixed.dim() != 3 or grid.shape != mixed.shape:
        raise ValueError(f"mixed and grid must both be (B, N, C), got {tuple(mixed.shape)} and {tuple(grid.shape)}")
    batch, _, channels = mixed.shape
    if gate.shape != (batch, 1, channels):
        raise ValueError(f"gate must be (B, 1, C) = {(batch, 1, channels)}, got {tuple(gate.shape)}")
    if skip_scale.numel() != 1:
        raise ValueError(f"skip_scale must hold one value, got shape {tuple(skip_scale.shape)}")
    _check_affine(weight, bias, (channels,))


def modulated_layer_norm(mixed: torch.Tensor, skip_scale: torch.Tensor, grid: torch.Tensor, gate: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                         out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The fused op on CUDA tensors (needs Triton): ``(B, N, C)`` -> ``(B, N, C)`` in
    ``out_dtype`` (default: float32, the dtype of the unfused LayerNorm's output)."""
    _check_modulated_arguments(mixed, skip_scale, grid, gate, weight, bias)
    return _modulated_forward(mixed.contiguous(), skip_scale, grid.contiguous(), gate.contiguous(), weight, bias,
                          float(eps), torch.float32 if out_dtype is None else out_dtype)


def modulated_layer_norm_reference(mixed: torch.Tensor, skip_scale: torch.Tensor, grid: torch.Tensor,
                                   gate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`modulated_layer_norm` in plain PyTorch ops (any device, autograd as usual)."""
    _check_modulated_arguments(mixed, skip_scale, grid, gate, weight, bias)
    product = mixed * skip_scale * grid * gate
    out = F.layer_norm(product, (mixed.shape[-1],), weight, bias, eps)
    return out if out_dtype is None else out.to(out_dtype)


# --------------------------------------------------------------------------- gated group norm

@torch.library.custom_op(_GATED, mutates_args=())
def _gated_forward(ys: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    return _kernels().gated_norm_fwd(ys, z, weight, bias, eps)


@_gated_forward.register_fake
def _(ys, z, weight, bias, eps):
    return z.new_empty(z.shape)


@torch.library.custom_op(_GATED + "_backward", mutates_args=())
def _gated_backward(dout: torch.Tensor, ys: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dys, dz, dweight, dbias = _kernels().gated_norm_bwd(dout, ys, z, weight, bias, eps)
    return dys, dz, dweight.to(weight.dtype), dbias.to(bias.dtype)


@_gated_backward.register_fake
def _(dout, ys, z, weight, bias, eps):
    return torch.empty_like(ys), z.new_empty(z.shape), torch.empty_like(weight), torch.empty_like(bias)


def _gated_setup_context(ctx, inputs, output):
    ys, z, weight, bias, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(ys, z, weight, bias)


def _gated_backward_rule(ctx, dout):
    ys, z, weight, bias = ctx.saved_tensors
    dys, dz, dweight, dbias = _gated_backward(dout.contiguous(), ys, z, weight, bias, ctx.eps)
    return dys, dz, dweight, dbias, None


_gated_forward.register_autograd(_gated_backward_rule, setup_context=_gated_setup_context)


def _check_gated_arguments(ys, z, weight, bias) -> None:
    if ys.dim() < 2:
        raise ValueError(f"ys must be (..., G, D), got shape {tuple(ys.shape)}")
    groups, width = ys.shape[-2:]
    if z.shape[-1] != groups * width or z.numel() != ys.numel():
        raise ValueError(f"z must be (..., G * D) with one value for each of ys (G * D = {groups * width}), "
                         f"got z {tuple(z.shape)} for ys {tuple(ys.shape)}")
    _check_affine(weight, bias, (groups, width))


def gated_group_norm(ys: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float = 1e-5) -> torch.Tensor:
    """The fused op on CUDA tensors (needs Triton): ``ys`` ``(..., G, D)`` and ``z``
    ``(..., G * D)`` (any shape with those values, e.g. ``(B, H, W, G * D)``; a unit
    channel stride, as half of a wider projection's output has) -> ``z``'s shape and dtype."""
    _check_gated_arguments(ys, z, weight, bias)
    groups, width = ys.shape[-2:]
    flat_z = z.reshape(-1, groups * width)  # a view for a projection's half
    if flat_z.stride(-1) != 1:
        flat_z = flat_z.contiguous()
    out = _gated_forward(ys.reshape(-1, groups, width).contiguous(), flat_z, weight, bias, float(eps))
    return out.view(z.shape)


def gated_group_norm_reference(ys: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               eps: float = 1e-5) -> torch.Tensor:
    """:func:`gated_group_norm` in plain PyTorch ops (any device, autograd as usual)."""
    _check_gated_arguments(ys, z, weight, bias)
    compute = torch.promote_types(ys.dtype, torch.float32)
    normed = F.layer_norm(ys.to(compute), ys.shape[-1:], eps=eps)
    affine = torch.addcmul(bias.to(compute), normed, weight.to(compute))
    return (affine.reshape(z.shape) * F.silu(z.to(compute))).to(z.dtype)


# --------------------------------------------------------------------------- pooled norm

@torch.library.custom_op(_POOLED, mutates_args=())
def _pooled_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().pooled_norm_fwd(x, weight, bias, eps, out_dtype)


@_pooled_forward.register_fake
def _(x, weight, bias, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((x.shape[0], 1, x.shape[2]), dtype=out_dtype)


@torch.library.custom_op(_POOLED + "_backward", mutates_args=())
def _pooled_backward(dout: torch.Tensor, dpooled: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dweight, dbias = _kernels().pooled_norm_bwd(dout, dpooled, x, weight, eps)
    return dx, dweight.to(weight.dtype), dbias.to(weight.dtype)


@_pooled_backward.register_fake
def _(dout, dpooled, x, weight, eps):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _pooled_setup_context(ctx, inputs, output):
    x, weight, bias, eps, out_dtype = inputs
    ctx.eps, ctx.bias_dtype = eps, bias.dtype
    ctx.save_for_backward(x, weight)


def _pooled_backward_rule(ctx, dout, dpooled):
    x, weight = ctx.saved_tensors
    batch, _, channels = x.shape
    # an output the loss does not use has no gradient
    dout = torch.zeros_like(x) if dout is None else dout.contiguous()
    dpooled = x.new_zeros((batch, 1, channels)) if dpooled is None else dpooled.contiguous()
    dx, dweight, dbias = _pooled_backward(dout, dpooled, x, weight, ctx.eps)
    return dx, dweight, dbias.to(ctx.bias_dtype), None, None


_pooled_forward.register_autograd(_pooled_backward_rule, setup_context=_pooled_setup_context)


def _check_pooled_arguments(x, weight, bias) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got {tuple(x.shape)}")
    _check_affine(weight, bias, tuple(x.shape[-1:]))


def pooled_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                      out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op on CUDA tensors (needs Triton): ``(out, pooled)``, ``(B, N, C)`` and
    ``(B, 1, C)``, both in ``out_dtype`` (default: ``x``'s)."""
    _check_pooled_arguments(x, weight, bias)
    return _pooled_forward(x.contiguous(), weight, bias, float(eps), x.dtype if out_dtype is None else out_dtype)


def pooled_layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                                out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pooled_layer_norm` in plain PyTorch ops (any device, autograd as usual)."""
    _check_pooled_arguments(x, weight, bias)
    # in float32 at least, as under autocast
    out = F.layer_norm(x.to(torch.promote_types(x.dtype, torch.float32)), x.shape[-1:], weight, bias, eps)
    out = out.to(x.dtype if out_dtype is None else out_dtype)
    return out, out.mean(dim=1, keepdim=True)


# --------------------------------------------------------------------------- residual norm

@torch.library.custom_op(_RESIDUAL, mutates_args=())
def _residual_forward(x: torch.Tensor, branch: torch.Tensor, keep: Optional[torch.Tensor], weight: torch.Tensor,
                      bias: torch.Tensor, eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().residual_norm_fwd(x, branch, keep, weight, bias, eps, out_dtype)


@_residual_forward.register_fake
def _(x, branch, keep, weight, bias, eps, out_dtype):
    total = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype))
    return total, x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op(_RESIDUAL + "_backward", mutates_args=())
def _residual_backward(dtotal: torch.Tensor, dout: torch.Tensor, total: torch.Tensor, keep: Optional[torch.Tensor],
                       weight: torch.Tensor, eps: float, x_dtype: torch.dtype, branch_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dbranch, dweight, dbias = _kernels().residual_norm_bwd(dtotal, dout, total, keep, weight, eps, x_dtype,
                                                               branch_dtype)
    return dx, dbranch, dweight.to(weight.dtype), dbias.to(weight.dtype)


@_residual_backward.register_fake
def _(dtotal, dout, total, keep, weight, eps, x_dtype, branch_dtype):
    return (total.new_empty(total.shape, dtype=x_dtype), total.new_empty(total.shape, dtype=branch_dtype),
            torch.empty_like(weight), torch.empty_like(weight))


def _residual_setup_context(ctx, inputs, output):
    x, branch, keep, weight, bias, eps, out_dtype = inputs
    ctx.eps, ctx.dtypes = eps, (x.dtype, branch.dtype, bias.dtype)
    ctx.save_for_backward(output[0], keep, weight)  # the total is the next layer's input anyway


def _residual_backward_rule(ctx, dtotal, dout):
    total, keep, weight = ctx.saved_tensors
    x_dtype, branch_dtype, bias_dtype = ctx.dtypes
    # an output the loss does not use has no gradient
    dtotal = torch.zeros_like(total) if dtotal is None else dtotal.contiguous()
    dout = torch.zeros_like(total) if dout is None else dout.contiguous()
    dx, dbranch, dweight, dbias = _residual_backward(dtotal, dout, total, keep, weight, ctx.eps, x_dtype,
                                                     branch_dtype)
    return dx, dbranch, None, dweight, dbias.to(bias_dtype), None, None


_residual_forward.register_autograd(_residual_backward_rule, setup_context=_residual_setup_context)


def _check_residual_arguments(x, branch, keep, weight, bias) -> None:
    if x.dim() != 3 or branch.shape != x.shape:
        raise ValueError(f"x and branch must both be (B, N, C), got {tuple(x.shape)} and {tuple(branch.shape)}")
    if keep is not None and keep.shape != x.shape[:1]:
        raise ValueError(f"keep must be (B,) = ({x.shape[0]},) or None, got {tuple(keep.shape)}")
    _check_affine(weight, bias, tuple(x.shape[-1:]))


def residual_layer_norm(x: torch.Tensor, branch: torch.Tensor, keep: Optional[torch.Tensor], weight: torch.Tensor,
                        bias: torch.Tensor, eps: float = 1e-5, out_dtype: Optional[torch.dtype] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op on CUDA tensors (needs Triton): ``(total, out)``, both ``(B, N, C)``;
    ``total`` in the dtype of ``x + branch``, ``out`` in ``out_dtype`` (default: ``total``'s)."""
    _check_residual_arguments(x, branch, keep, weight, bias)
    total_dtype = torch.promote_types(x.dtype, branch.dtype)
    return _residual_forward(x.contiguous(), branch.contiguous(), None if keep is None else keep.contiguous(),
                             weight, bias, float(eps), total_dtype if out_dtype is None else out_dtype)


def residual_layer_norm_reference(x: torch.Tensor, branch: torch.Tensor, keep: Optional[torch.Tensor],
                                  weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                                  out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`residual_layer_norm` in plain PyTorch ops (any device, autograd as usual)."""
    _check_residual_arguments(x, branch, keep, weight, bias)
    total = x + (branch if keep is None else branch * keep.view(-1, 1, 1).to(branch.dtype))
    out = F.layer_norm(total, total.shape[-1:], weight, bias, eps)
    return total, out if out_dtype is None else out.to(out_dtype)
