"""SS2D: the visual state-space block GroupMamba runs on each channel group.

One direction per block (the released models use K = 1): project the input to
``2 * d_inner`` channels, split into a signal ``x`` and a gate ``z``; ``x`` goes
through a depth-wise conv and SiLU, is read as a sequence in the block's scan
direction, runs through the selective scan (``d_state`` = N, here 1), is put
back on the grid and layer-normed; the result is gated by ``SiLU(z)`` and
projected back to ``d_model`` channels.

Parameter names and shapes follow the released checkpoints (``x_proj_weight``
and ``dt_projs_*`` carry a leading K = 1 axis; ``A_logs`` and ``Ds`` are
flattened over it), so official weights load unchanged.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import depthwise_conv, fused_norm, grid_scan, triton_runs_on

from .csms6s import check_direction, from_sequence, selective_scan, to_sequence

__all__ = ["SS2D", "can_batch", "channels_last_weight", "grouped_ss2d"]


def channels_last_weight(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` with its weight stored channels-last, the layout of its weight gradient.

    The depth-wise convs run on channels-last maps, and a conv's weight gradient takes
    its input's layout. For a ``(C, 1, k, k)`` weight both layouts are the same memory
    and differ only in the stride of the size-1 dimension, so autograd keeps the
    gradient as it comes; a weight stored the other way then has a gradient whose
    strides differ from its own, which DistributedDataParallel reports ("Grad strides
    do not match bucket view strides"). ``.to``, ``load_state_dict`` and copies keep
    the layout.
    """
    conv.weight = nn.Parameter(conv.weight.detach().to(memory_format=torch.channels_last))
    return conv


def _init_dt_projection(weight: torch.Tensor, bias: torch.Tensor, dt_rank: int, dt_scale: float,
                        dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """Mamba's step-size init: ``softplus(bias)`` log-uniform in ``[dt_min, dt_max]``."""
    bound = dt_scale * dt_rank ** -0.5  # keeps the variance of delta independent of dt_rank
    nn.init.uniform_(weight, -bound, bound)
    log_min, log_max = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand_like(bias) * (log_max - log_min) + log_min).clamp(min=dt_init_floor)
    inverse_softplus = dt + torch.log(-torch.expm1(-dt))
    bias.copy_(inverse_softplus)


class SS2D(nn.Module):
    """Single-direction 2-D selective scan on channels-last maps.

    Args:
        d_model: input and output channels.
        d_state: SSM state size N.
        ssm_ratio: ``d_inner = int(ssm_ratio * d_model)``.
        dt_rank: rank of the step-size projection; ``"auto"`` is ``ceil(d_model / 16)``.
        d_conv: depth-wise conv kernel size (< 2 disables the conv).
        direction: scan order, one of :data:`models.csms6s.SCAN_DIRECTIONS`.
        scan_backend: one of :data:`kernels.grid_scan.SCAN_BACKENDS`. On its own an SS2D
            scans one sequence, so ``"grid"`` (the grouped pipeline's kernel) runs here
            as the sequence Triton scan.

    Shapes: ``(B, H, W, d_model)`` -> ``(B, H, W, d_model)``.
    """

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 1.0, dt_rank="auto",
                 d_conv: int = 3, conv_bias: bool = True, bias: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, direction: str = "row", scan_backend: str = "auto"):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.direction = check_direction(direction)
        if scan_backend not in grid_scan.SCAN_BACKENDS:
            raise ValueError(f"unknown scan backend {scan_backend!r}: expected one of "
                             f"{', '.join(grid_scan.SCAN_BACKENDS)}")
        self.scan_backend = scan_backend

        # Registration order reproduces the released state_dict order.
        self.x_proj_weight = nn.Parameter(torch.empty(1, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(1, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(1, d_inner))
        self.A_logs = nn.Parameter(torch.empty(d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(d_inner))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True

        self.out_norm = nn.LayerNorm(d_inner)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.act = nn.SiLU()
        self.conv2d = channels_last_weight(nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2,
                                                     groups=d_inner, bias=conv_bias)) if d_conv > 1 else None
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self._init_ssm_parameters(dt_scale, dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_ssm_parameters(self, dt_scale, dt_min, dt_max, dt_init_floor) -> None:
        if self.A_logs.is_meta:
            return  # shape-only build
        # x_proj starts like a default nn.Linear (kaiming-uniform, bound 1/sqrt(fan_in))
        fan_in = self.x_proj_weight.shape[-1]
        nn.init.uniform_(self.x_proj_weight, -fan_in ** -0.5, fan_in ** -0.5)
        _init_dt_projection(self.dt_projs_weight, self.dt_projs_bias, self.dt_rank, dt_scale,
                            dt_min, dt_max, dt_init_floor)
        # S4D-real: A = -(1, 2, ..., N) for every channel
        states = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_logs.device)
        self.A_logs.copy_(torch.log(states).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, d_state={self.d_state}, dt_rank={self.dt_rank}"

    def _scan_on_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W)`` -> float32 ``(B, D, H, W)``: projections, then the scan."""
        height, width = x.shape[-2:]
        xs = to_sequence(x, self.direction)  # (B, D, L)
        # per-position projections; (c, D) @ (B, D, L) -> (B, c, L)
        x_dbl = torch.matmul(self.x_proj_weight[0], xs)
        dts, Bs, Cs = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        dts = torch.matmul(self.dt_projs_weight[0], dts)  # (B, D, L)
        A = -torch.exp(self.A_logs.float())
        backend = "triton" if self.scan_backend == "grid" else self.scan_backend
        ys = selective_scan(xs, dts, A, Bs.unsqueeze(1), Cs.unsqueeze(1), self.Ds,
                            self.dt_projs_bias.view(-1), delta_softplus=True, backend=backend)
        return from_sequence(ys, self.direction, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        z = self.act(z)
        x = x.permute(0, 3, 1, 2)  # (B, D, H, W) view for the conv
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = self.act(x)
        y = self._scan_on_grid(x).permute(0, 2, 3, 1)  # float32 (B, H, W, D)
        y = self.out_norm(y).to(z.dtype)
        return self.out_proj(y * z)


# --------------------------------------------------------------------------- grouped

def can_batch(scans: Sequence[SS2D]) -> bool:
    """Whether :func:`grouped_ss2d` computes exactly what the scans would one by one.

    It needs one shape and configuration for all of them (only the direction and the
    weights differ), a depth-wise conv, and a LayerNorm with weight and bias.
    """
    first = scans[0]

    def config(scan: SS2D):
        conv = scan.conv2d
        norm = scan.out_norm
        return (scan.x_proj_weight.shape, scan.dt_projs_weight.shape, scan.A_logs.shape,
                scan.in_proj.weight.shape, scan.in_proj.bias is None, scan.out_proj.weight.shape,
                scan.out_proj.bias is None, scan.scan_backend, norm.normalized_shape, norm.eps,
                norm.weight is None, norm.bias is None,
                None if conv is None else (conv.kernel_size, conv.padding, conv.bias is None))

    return (first.conv2d is not None and first.out_norm.weight is not None
            and first.out_norm.bias is not None and all(config(s) == config(first) for s in scans))


def _section_bounds(sections: Sequence[int]) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(sections))
    return list(zip([0] + ends[:-1], ends))


def _block_diagonal_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], sections: Sequence[int],
                           biases: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
    """:func:`_grouped_linear` as one dense GEMM with a block-diagonal weight per section."""
    bounds = _section_bounds(sections)
    weight = torch.cat([torch.block_diag(*(w[lo:hi] for w in weights)) for lo, hi in bounds])
    bias = None if biases is None else torch.cat([b[lo:hi] for lo, hi in bounds for b in biases])
    return list(F.linear(x, weight, bias).split([len(weights) * s for s in sections], dim=-1))


def _batched_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], sections: Sequence[int],
                    biases: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
    """:func:`_grouped_linear` as one GEMM per group (batched over the groups)."""
    groups = len(weights)
    lead = x.shape[:-1]
    tokens = x.reshape(-1, groups, x.shape[-1] // groups).transpose(0, 1)  # (G, N, in)
    stacked = _stacked(weights).transpose(1, 2)  # (G, in, out)
    if biases is None:
        out = torch.bmm(tokens, stacked)
    else:
        out = torch.baddbmm(_stacked(biases).unsqueeze(1), tokens, stacked)
    return [out[:, :, lo:hi].transpose(0, 1).reshape(*lead, groups * (hi - lo))
            for lo, hi in _section_bounds(sections)]


def _grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], sections: Sequence[int],
                    biases: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
    """Group ``g``'s channels of ``x`` through ``F.linear(., weights[g], biases[g])``.

    ``x`` is ``(..., G * in)`` with group-major channels; ``weights[g]`` is
    ``(sum(sections), in)``. The output rows are cut into ``sections`` and each
    section comes back for all groups side by side: ``(..., G * section)``.

    On CUDA one dense GEMM with a block-diagonal weight: G times the multiply-adds
    of a GEMM per group, but these layers are memory-bound there, and a batched
    GEMM over the groups reads and writes G strided slices whose odd widths (stage
    3 of the released models has 87-channel groups) leave cuBLAS only unaligned,
    small-tile kernels. On the CPU, where the multiply-adds are the cost, one GEMM
    per group.
    """
    linear = _block_diagonal_linear if x.is_cuda else _batched_linear
    return linear(x, weights, sections, biases)


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # stacked at call time (not cached): autograd then splits the gradient back per group
    return torch.stack(list(tensors))


def _is_plain_3x3(conv: nn.Conv2d) -> bool:
    """Whether the fused kernel computes this depth-wise conv: 3x3, stride 1, zero padding 1."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


def grouped_ss2d(scans: Sequence[SS2D], x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """All of ``scans`` on their channel groups of ``x`` as one batched computation.

    Equal to ``torch.cat([scan(g) for scan, g in zip(scans, x.chunk(G, -1))], -1)``
    (rounding aside) when :func:`can_batch` holds, but with one kernel per step for
    all G groups instead of G. Everything stays channels-last with the groups side
    by side, ``(B, H, W, G * channels)``: the projections are linear layers over all
    groups (:func:`_grouped_linear`), the depth-wise convs one conv over the
    ``G * d_inner`` channels, and the selective scans one call of
    :func:`kernels.grid_scan.selective_scan_grid` with the scans' ``scan_backend``,
    which reads each group in its scan order (``grid``: straight from the
    channels-last maps; the sequence backends: gathered into sequences and back).
    With ``fused`` (where Triton runs: :func:`kernels.triton_runs_on`) the conv and SiLU
    run as one fused op (:mod:`kernels.depthwise_conv`, for a 3x3 conv), and so do the
    output LayerNorm, its affine and the SiLU gate
    (:func:`kernels.fused_norm.gated_group_norm`).

    Shapes: ``(B, H, W, G * d_model)`` -> ``(B, H, W, G * d_model)``.
    """
    first = scans[0]
    groups = len(scans)
    batch, height, width, channels = x.shape
    length = height * width
    d_inner = first.out_norm.normalized_shape[0]

    # in_proj as one linear (the conv then copies its strided half); two linears,
    # signal and gate, measured no faster on an H200 (bench/RESULTS.md)
    xs, z = _grouped_linear(x, [s.in_proj.weight for s in scans], [d_inner, d_inner],
                            None if first.in_proj.bias is None else [s.in_proj.bias for s in scans])
    fused = fused and triton_runs_on(xs)

    # one depth-wise conv over all groups' channels, group g in channels [g * d_inner, (g + 1) * d_inner)
    conv = first.conv2d
    conv_weight = torch.cat([s.conv2d.weight for s in scans])
    conv_bias = None if conv.bias is None else torch.cat([s.conv2d.bias for s in scans])
    if fused and _is_plain_3x3(conv):
        # conv, bias and SiLU in one kernel; its backward recomputes the conv from xs
        xs = depthwise_conv.conv3x3_act_linear(xs, conv_weight, conv_bias, "silu")
    else:
        xs = F.conv2d(xs.permute(0, 3, 1, 2), conv_weight, conv_bias,
                      conv.stride, conv.padding, conv.dilation, groups * d_inner)
        xs = first.act(xs).permute(0, 2, 3, 1)  # (B, H, W, G * d_inner)

    # x_proj and dt_proj run on the grid too: they depend on the position only
    dt_rank, d_state = first.dt_rank, first.d_state
    dts, Bs, Cs = _grouped_linear(xs, [s.x_proj_weight[0] for s in scans], [dt_rank, d_state, d_state])
    (dts,) = _grouped_linear(dts, [s.dt_projs_weight[0] for s in scans], [d_inner])

    # the scan reads the channels-last maps in each group's order and writes y back
    # in place: (B, L, G * d_inner) float32
    A = -torch.exp(torch.cat([s.A_logs for s in scans]).float())
    ys = grid_scan.selective_scan_grid(
        xs.reshape(batch, length, groups * d_inner), dts.reshape(batch, length, groups * d_inner), A,
        Bs.reshape(batch, length, groups * d_state), Cs.reshape(batch, length, groups * d_state),
        torch.cat([s.Ds for s in scans]), torch.cat([s.dt_projs_bias.view(-1) for s in scans]),
        tuple(s.direction for s in scans), height, width, backend=first.scan_backend)
    ys = ys.view(batch, length, groups, d_inner)
    # per-group LayerNorm: the normalisation is shared, only the affine differs per group
    norm = first.out_norm
    weight, bias = _stacked(s.out_norm.weight for s in scans), _stacked(s.out_norm.bias for s in scans)
    if fused:
        # the norm, its affine and the SiLU gate in one kernel; its backward recomputes them
        ys = fused_norm.gated_group_norm(ys, z, weight, bias, norm.eps)
    else:
        ys = torch.addcmul(bias, F.layer_norm(ys, norm.normalized_shape, eps=norm.eps), weight)
        ys = ys.to(z.dtype).reshape(batch, height, width, groups * d_inner) * first.act(z)

    (out,) = _grouped_linear(ys, [s.out_proj.weight for s in scans], [channels // groups],
                             None if first.out_proj.bias is None else [s.out_proj.bias for s in scans])
    return out
