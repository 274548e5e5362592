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

import math

import torch
import torch.nn as nn

from .csms6s import check_direction, from_sequence, selective_scan, to_sequence

__all__ = ["SS2D"]


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
