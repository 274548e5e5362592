"""Fused 3x3 depth-wise conv + activation (+ the linear layer after it) for CUDA tensors.

    out = linear(act(depthwise_conv3x3(x) + conv_bias), linear_weight, linear_bias)

on channels-last ``x`` ``(B, H, W, C)``, as one differentiable custom op whose
backward recomputes the conv and the activation from ``x``: only the conv's
input is kept for the backward pass, not the conv's output, the activation's
output or the linear layer's input (three full-size tensors in GroupMamba's
feed-forward, ~45 % of a block's saved activations), and the conv, bias and
activation run as one Triton kernel each way instead of cuDNN's depth-wise
kernels plus separate elementwise ones.

Numerics are those of the unfused layers: float32 accumulation, the output in
``x``'s dtype; under autocast the linear layer runs in ``x``'s dtype as
autocast would run it. The kernels are in :mod:`.triton_dwconv` (imported at
the first call, so CPU-only machines never need Triton); :func:`reference` is
the same computation in plain PyTorch ops, for tests and the CPU.

``torch.compile`` traces the op (fake kernels, registered backward) without a
graph break, and CUDA graphs can capture it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels import HAS_TRITON  # re-exported: whether Triton is installed

__all__ = ["HAS_TRITON", "conv3x3_act_linear", "reference", "ACTIVATION_FUNCTIONS"]

ACTIVATION_FUNCTIONS = {"none": lambda t: t, "gelu": F.gelu, "silu": F.silu}

_OP = "groupmamba_dwconv::conv3x3_act_linear"


def _kernels():
    from . import triton_dwconv  # noqa: PLC0415 - needs Triton and a GPU (or its interpreter)
    return triton_dwconv


def _linear(h: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    if weight is None:
        return h
    # in the activations' dtype, as autocast casts a linear layer's weights
    return F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))


def _empty_like_param(t: Optional[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: an empty float32 tensor stands for "no gradient";
    # a gradient has its parameter's layout (a channels-last conv weight's too), as
    # autograd and DistributedDataParallel's gradient buckets expect
    if t is None:
        return torch.empty((0,), dtype=torch.float32, device=ref.device)
    return torch.empty_like(t)


@torch.library.custom_op(_OP, mutates_args=())
def _fused_forward(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor], act: str,
                   linear_weight: Optional[torch.Tensor], linear_bias: Optional[torch.Tensor]) -> torch.Tensor:
    h = _kernels().dwconv_act_fwd(x, conv_weight, conv_bias, act)
    return _linear(h, linear_weight, linear_bias)


@_fused_forward.register_fake
def _(x, conv_weight, conv_bias, act, linear_weight, linear_bias):
    out_channels = x.shape[-1] if linear_weight is None else linear_weight.shape[0]
    return x.new_empty((*x.shape[:-1], out_channels))


@torch.library.custom_op(_OP + "_backward", mutates_args=())
def _fused_backward(dout: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor,
                    conv_bias: Optional[torch.Tensor], act: str, linear_weight: Optional[torch.Tensor],
                    linear_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
    kernels = _kernels()
    dlinear_weight = _empty_like_param(None, x)
    dlinear_bias = _empty_like_param(None, x)
    if linear_weight is None:
        dh = dout
    else:
        dh = dout.matmul(linear_weight.to(dout.dtype))
    g, h = kernels.dwconv_act_bwd_pre(dh, x, conv_weight, conv_bias, act, recompute_output=linear_weight is not None)
    if linear_weight is not None:
        flat_dout = dout.reshape(-1, dout.shape[-1])
        dlinear_weight = flat_dout.t().matmul(h.reshape(-1, h.shape[-1])).to(linear_weight.dtype)
        if linear_bias is not None:
            dlinear_bias = flat_dout.sum(0, dtype=torch.float32).to(linear_bias.dtype)
    dx, dconv_weight, dconv_bias = kernels.dwconv_bwd_input_weight(g, x, conv_weight)
    dconv_bias = dconv_bias.to(conv_bias.dtype) if conv_bias is not None else _empty_like_param(None, x)
    return dx, _empty_like_param(conv_weight, x).copy_(dconv_weight), dconv_bias, dlinear_weight, dlinear_bias


@_fused_backward.register_fake
def _(dout, x, conv_weight, conv_bias, act, linear_weight, linear_bias):
    return (x.new_empty(x.shape), _empty_like_param(conv_weight, x), _empty_like_param(conv_bias, x),
            _empty_like_param(linear_weight, x), _empty_like_param(linear_bias, x))


def _setup_context(ctx, inputs, output):
    x, conv_weight, conv_bias, act, linear_weight, linear_bias = inputs
    ctx.act = act
    ctx.save_for_backward(x, conv_weight, conv_bias, linear_weight, linear_bias)


def _backward(ctx, dout):
    x, conv_weight, conv_bias, linear_weight, linear_bias = ctx.saved_tensors
    dx, dcw, dcb, dlw, dlb = _fused_backward(dout.contiguous(), x, conv_weight, conv_bias, ctx.act,
                                             linear_weight, linear_bias)
    return (dx, dcw, None if conv_bias is None else dcb, None,
            None if linear_weight is None else dlw, None if linear_bias is None else dlb)


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_arguments(x: torch.Tensor, conv_weight: torch.Tensor, act: str) -> None:
    if act not in ACTIVATION_FUNCTIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATION_FUNCTIONS)}, got {act!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be channels-last (B, H, W, C), got shape {tuple(x.shape)}")
    if conv_weight.shape != (x.shape[-1], 1, 3, 3):
        raise ValueError(f"conv_weight must be ({x.shape[-1]}, 1, 3, 3) (3x3 depth-wise), "
                         f"got {tuple(conv_weight.shape)}")


def conv3x3_act_linear(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                       act: str = "gelu", linear_weight: Optional[torch.Tensor] = None,
                       linear_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused op on a CUDA tensor (needs Triton): ``(B, H, W, C)`` -> ``(B, H, W, out)``.

    ``x`` needs a unit channel stride (a channels-last view, e.g. half of a wider
    projection's output, is fine). ``conv_weight`` is ``(C, 1, 3, 3)`` (stride 1,
    zero padding 1); ``linear_weight`` ``(out, C)`` or None for no linear layer.
    """
    _check_arguments(x, conv_weight, act)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _fused_forward(x, conv_weight, conv_bias, act, linear_weight, linear_bias)


def reference(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
              act: str = "gelu", linear_weight: Optional[torch.Tensor] = None,
              linear_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`conv3x3_act_linear` in plain PyTorch ops (any device, autograd as usual)."""
    _check_arguments(x, conv_weight, act)
    pre = F.conv2d(x.permute(0, 3, 1, 2), conv_weight.to(x.dtype),
                   None if conv_bias is None else conv_bias.to(x.dtype), padding=1, groups=x.shape[-1])
    h = ACTIVATION_FUNCTIONS[act](pre).permute(0, 2, 3, 1)
    return _linear(h, linear_weight, linear_bias)
