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

import functools
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .csms6s import check_direction, from_sequence, selective_scan, to_sequence

__all__ = ["SS2D", "can_batch", "grouped_ss2d"]


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
        scan_backend: selective-scan backend name (see ``kernels.selective_scan``).

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
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                bias=conv_bias) if d_conv > 1 else None
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
        ys = selective_scan(xs, dts, A, Bs.unsqueeze(1), Cs.unsqueeze(1), self.Ds,
                            self.dt_projs_bias.view(-1), delta_softplus=True, backend=self.scan_backend)
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


def _build_scan_orders(directions: tuple[str, ...], height: int, width: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the grid position read at each step of its scan, and the inverse.

    ``order[g, t]`` is the row-major position that group ``g`` reads at step ``t``;
    gathering with it replaces the per-direction transpose/flatten/flip copies by
    one op for all groups. Both are ``(G, H * W)`` int64.
    """
    grid = torch.arange(height * width, device=device).view(1, 1, height, width)
    order = torch.stack([to_sequence(grid, direction).reshape(-1) for direction in directions])
    return order, torch.argsort(order, dim=1)


@functools.lru_cache(maxsize=64)
def _cached_scan_orders(directions: tuple[str, ...], height: int, width: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # cached across calls, so never an inference tensor (autograd could not save it)
    with torch.inference_mode(False):
        return _build_scan_orders(directions, height, width, device)


def _scan_orders(directions: tuple[str, ...], height: int, width: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        # traced into the graph instead (a handful of index ops the compiler folds);
        # a Python-level cache is invisible to the compiled code
        return _build_scan_orders(directions, height, width, device)
    return _cached_scan_orders(directions, height, width, device)


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # stacked at call time (not cached): autograd then splits the gradient back per group
    return torch.stack(list(tensors))


def grouped_ss2d(scans: Sequence[SS2D], x: torch.Tensor) -> torch.Tensor:
    """All of ``scans`` on their channel groups of ``x`` as one batched computation.

    Equal to ``torch.cat([scan(g) for scan, g in zip(scans, x.chunk(G, -1))], -1)``
    (rounding aside) when :func:`can_batch` holds, but with one kernel per step for
    all G groups instead of G: the projections are batched matmuls over the group
    axis, the depth-wise convs one conv over the G * d_inner channels, and the
    selective scan one call with the groups side by side along D (B and C with G
    groups). Each group reads its own direction because its channels are gathered
    into that order before the scan and scattered back after it.

    Shapes: ``(B, H, W, G * d_model)`` -> ``(B, H, W, G * d_model)``.
    """
    first = scans[0]
    groups = len(scans)
    batch, height, width, channels = x.shape
    length = height * width
    d_model = channels // groups

    # in_proj as one bmm, group-major: (G, B*L, d_model) @ (G, d_model, 2 * d_inner)
    tokens = x.reshape(batch * length, groups, d_model).transpose(0, 1)
    in_weight = _stacked(s.in_proj.weight for s in scans).transpose(1, 2)
    if first.in_proj.bias is None:
        xz = torch.bmm(tokens, in_weight)
    else:
        xz = torch.baddbmm(_stacked(s.in_proj.bias for s in scans).unsqueeze(1), tokens, in_weight)
    d_inner = xz.shape[-1] // 2
    xs, z = xz.split(d_inner, dim=-1)
    z = first.act(z)

    # one depth-wise conv over all groups' channels, group g in channels [g*d_inner, (g+1)*d_inner)
    xs = xs.view(groups, batch, length, d_inner).permute(1, 0, 3, 2).reshape(batch, groups * d_inner,
                                                                                height, width)
    conv = first.conv2d
    conv_bias = None if conv.bias is None else torch.cat([s.conv2d.bias for s in scans])
    xs = F.conv2d(xs, torch.cat([s.conv2d.weight for s in scans]), conv_bias, conv.stride, conv.padding,
                  conv.dilation, groups * d_inner)
    xs = first.act(xs)

    # every group into its own scan order at once: (B, G, d_inner, L)
    order, inverse = _scan_orders(tuple(s.direction for s in scans), height, width, x.device)
    xs = xs.view(batch, groups, d_inner, length).gather(
        3, order.view(1, groups, 1, length).expand(batch, groups, d_inner, length))

    # x_proj and dt_proj per group, broadcast over the batch: (G, c, D) @ (B, G, D, L)
    x_dbl = torch.matmul(_stacked(s.x_proj_weight[0] for s in scans), xs)
    dts, Bs, Cs = x_dbl.split([first.dt_rank, first.d_state, first.d_state], dim=2)
    dts = torch.matmul(_stacked(s.dt_projs_weight[0] for s in scans), dts)  # (B, G, d_inner, L)
    A = -torch.exp(torch.cat([s.A_logs for s in scans]).float())
    ys = selective_scan(xs.view(batch, groups * d_inner, length), dts.view(batch, groups * d_inner, length),
                        A, Bs, Cs, torch.cat([s.Ds for s in scans]),
                        torch.cat([s.dt_projs_bias.view(-1) for s in scans]),
                        delta_softplus=True, backend=first.scan_backend)

    # back to row-major and group-major channels-last in one gather: (G, B, L, d_inner)
    ys = ys.view(batch, groups, d_inner, length).permute(1, 0, 3, 2).gather(
        2, inverse.view(groups, 1, length, 1).expand(groups, batch, length, d_inner))
    # per-group LayerNorm: the normalisation is shared, only the affine differs per group
    norm = first.out_norm
    ys = torch.addcmul(_stacked(s.out_norm.bias for s in scans).unsqueeze(1).unsqueeze(1),
                       F.layer_norm(ys, norm.normalized_shape, eps=norm.eps),
                       _stacked(s.out_norm.weight for s in scans).unsqueeze(1).unsqueeze(1))
    ys = ys.to(z.dtype).view(groups, batch * length, d_inner) * z

    out_weight = _stacked(s.out_proj.weight for s in scans).transpose(1, 2)
    if first.out_proj.bias is None:
        out = torch.bmm(ys, out_weight)
    else:
        out = torch.baddbmm(_stacked(s.out_proj.bias for s in scans).unsqueeze(1), ys, out_weight)
    # (G, B, H, W, d_model) -> (B, H, W, G * d_model): the groups' outputs side by side
    return out.view(groups, batch, height, width, d_model).permute(1, 2, 3, 0, 4).reshape(
        batch, height, width, channels)
