"""The selective scan over channels-last maps, each channel group in its own scan order.

GroupMamba's four channel groups read one ``H x W`` grid in four orders (row-
and column-major, each forwards and backwards). :func:`selective_scan_grid`
takes the maps as the projections leave them, channels-last with the groups
side by side, and returns ``y`` in the same layout:

    u, delta: (batch, H * W, G * K)     B, C: (batch, H * W, G)     y: float32 (batch, H * W, G * K)

with ``A: (G * K, 1)`` and ``D``, ``delta_bias``: ``(G * K,)``; ``delta`` goes
through ``softplus(delta + delta_bias)``, as GroupMamba calls the scan.

The ``backend`` argument names how (:data:`SCAN_BACKENDS`; all equal up to float32
rounding), and :func:`resolve_backend` is the one place a request is resolved:

- ``"grid"`` (CUDA tensors with Triton, one state, N = 1): one custom op whose
  Triton kernels (:mod:`.triton_grid_scan`) walk each group's order over the maps
  in place, forward and backward (:func:`fused_scan`);
- ``"triton"``, ``"cuda"``, ``"torch"``: :func:`reference`: each group gathered
  into its order as ``(batch, G * K, L)`` sequences, that backend's selective scan
  (:mod:`kernels.selective_scan`), and ``y`` gathered back to the grid;
- ``"auto"``: ``"grid"`` where it can run, else the sequence scans' own ``auto``
  (the CUDA extension, then Triton, on a GPU; ``"torch"`` elsewhere).

``torch.compile`` traces the fused op (fake kernels, registered backward)
without a graph break, and CUDA graphs can capture it.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from kernels import HAS_TRITON  # re-exported: whether Triton is installed
from kernels import selective_scan as sequence_scan
from kernels.selective_scan import BackendUnavailableError, selective_scan_fn

__all__ = ["DIRECTION_CODES", "HAS_TRITON", "SCAN_BACKENDS", "fused_scan", "reference", "resolve_backend",
           "selective_scan_grid", "step_positions"]

# the values of GroupMamba's scan_backend (and of the scripts' --scan-backend)
SCAN_BACKENDS = ("auto", "grid") + sequence_scan.BACKENDS

# bit 0: column-major, bit 1: reversed (the kernels decode the same bits)
DIRECTION_CODES = {"row": 0, "col": 1, "row_reversed": 2, "col_reversed": 3}

_OP = "groupmamba_grid_scan::scan"


def _kernels():
    from . import triton_grid_scan  # noqa: PLC0415 - needs Triton and a GPU (or its interpreter)
    return triton_grid_scan


def _direction_code(direction: str) -> int:
    if direction not in DIRECTION_CODES:
        raise ValueError(f"unknown scan direction {direction!r}: expected one of {', '.join(DIRECTION_CODES)}")
    return DIRECTION_CODES[direction]


def _packed_codes(directions: Sequence[str]) -> int:
    """All groups' orders in one integer, two bits a group (a kernel argument, no tensor)."""
    if len(directions) > 15:
        raise ValueError(f"at most 15 channel groups, got {len(directions)}")
    return sum(_direction_code(direction) << (2 * group) for group, direction in enumerate(directions))


def step_positions(direction: str, height: int, width: int, device=None) -> torch.Tensor:
    """``(H * W,)`` int64: the row-major grid position read at each step of ``direction``."""
    code = _direction_code(direction)
    length = height * width
    steps = torch.arange(length, device=device)
    if code & 2:
        steps = length - 1 - steps
    if code & 1:  # step s of the column-major order reads row s % H of column s // H
        steps = (steps % height) * width + steps // height
    return steps


# ----------------------------------------------------------------------------------
# fused op (Triton)
# ----------------------------------------------------------------------------------

def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op(_OP, mutates_args=())
def _fused_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, delta_bias: torch.Tensor, codes: int, height: int, width: int,
                   state_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, delta, B, C = map(_unit_channel_stride, (u, delta, B, C))
    return _kernels().grid_scan_fwd(u, delta, A.contiguous(), B, C, D.contiguous(), delta_bias.contiguous(),
                                    codes, height, width, state_t)


@_fused_forward.register_fake
def _(u, delta, A, B, C, D, delta_bias, codes, height, width, state_t):
    batch, length, dim = u.shape
    chunks = -(-length // state_t) if state_t else 0
    return u.new_empty(u.shape, dtype=torch.float32), u.new_empty((batch, chunks, dim), dtype=torch.float32)


@torch.library.custom_op(_OP + "_backward", mutates_args=())
def _fused_backward(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor, D: torch.Tensor, delta_bias: torch.Tensor, states: torch.Tensor, codes: int,
                    height: int, width: int, state_t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    u, delta, B, C = map(_unit_channel_stride, (u, delta, B, C))
    return _kernels().grid_scan_bwd(dy.float().contiguous(), u, delta, A.contiguous(), B, C, D.contiguous(),
                                    delta_bias.contiguous(), states.contiguous(), codes, height, width, state_t)


@_fused_backward.register_fake
def _(dy, u, delta, A, B, C, D, delta_bias, states, codes, height, width, state_t):
    def like(t: torch.Tensor) -> torch.Tensor:
        return t.new_empty(t.shape)

    return like(u), like(delta), like(A), like(B), like(C), like(D), like(delta_bias)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, codes, height, width, state_t = inputs
    if state_t <= 0:
        raise RuntimeError("the grid scan's forward ran without states for its backward (state_t = 0)")
    ctx.grid = (codes, height, width, state_t)
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, dstates):
    grads = _fused_backward(dy, *ctx.saved_tensors, *ctx.grid)
    return (*grads, None, None, None, None)


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def resolve_backend(backend: str, device: torch.device, n_state: int = 1,
                    dtype: torch.dtype = torch.float32) -> str:
    """The scan that runs for a ``backend`` request on ``device``: ``"grid"``, or the
    sequence backend :func:`reference` runs (``"triton"``, ``"cuda"``, ``"torch"``).

    ``"auto"`` is ``"grid"`` on CUDA with Triton for one state (``n_state`` 1) and
    float32 or half precision, else the sequence scans' ``auto``. An explicit backend
    that cannot run here raises :class:`BackendUnavailableError` saying what to do.
    """
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}: expected one of {', '.join(SCAN_BACKENDS)}")
    grid_fits = n_state == 1 and dtype != torch.float64
    if backend == "auto" and device.type == "cuda" and HAS_TRITON and grid_fits:
        return "grid"
    if backend != "grid":
        return sequence_scan.resolve_backend(backend, device)
    if device.type != "cuda":
        raise BackendUnavailableError(f"scan backend 'grid' needs a CUDA GPU, and this runs on {device.type}; "
                                      "use --scan-backend auto (or torch) here")
    if not HAS_TRITON:
        raise BackendUnavailableError("scan backend 'grid' needs the 'triton' package (it ships with CUDA "
                                      "builds of torch on Linux); use --scan-backend auto, cuda or torch")
    if not grid_fits:
        raise ValueError(f"scan backend 'grid' takes one state in float32 or half precision, got "
                         f"N = {n_state} in {dtype}; use another backend")
    return "grid"


# ----------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------

def _check_shapes(u, delta, A, B, C, D, delta_bias, directions, height, width) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must be (batch, H * W, channels) of one shape, got "
                         f"{tuple(u.shape)} and {tuple(delta.shape)}")
    batch, length, dim = u.shape
    groups = len(directions)
    if length != height * width:
        raise ValueError(f"u has {length} positions, expected height * width = {height * width}")
    if groups == 0 or dim % groups:
        raise ValueError(f"{dim} channels do not split into {groups} groups")
    if B.shape != C.shape or B.dim() != 3 or B.shape[:2] != (batch, length) or B.shape[2] % groups:
        raise ValueError(f"B and C must be (batch, H * W, G * N) = ({batch}, {length}, {groups} * N), got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    n_state = B.shape[2] // groups
    if A.shape != (dim, n_state) or D.shape != (dim,) or delta_bias.shape != (dim,):
        raise ValueError(f"A must be ({dim}, {n_state}), D and delta_bias ({dim},); got {tuple(A.shape)}, "
                         f"{tuple(D.shape)}, {tuple(delta_bias.shape)}")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def fused_scan(u, delta, A, B, C, D, delta_bias, directions: Sequence[str], height: int,
               width: int) -> torch.Tensor:
    """The fused op (Triton; CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``); N = 1."""
    _check_shapes(u, delta, A, B, C, D, delta_bias, directions, height, width)
    if A.shape[-1] != 1:
        raise ValueError(f"the fused scan takes one state (N = 1), got A of shape {tuple(A.shape)}")
    tensors = (u, delta, A, B, C, D, delta_bias)
    # the states for the backward only when there will be one
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    state_t = _kernels().backward_chunk(u.shape[1], u.shape[2] // len(directions)) if wants_grad else 0
    y, _ = _fused_forward(u, delta, A.float(), B, C, D.float(), delta_bias.float(),
                          _packed_codes(directions), height, width, state_t)
    return y


def _build_orders(directions: tuple[str, ...], height: int, width: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, L)`` int64 each: per group the position read at each step, and its inverse."""
    order = torch.stack([step_positions(direction, height, width, device) for direction in directions])
    return order, torch.argsort(order, dim=1)


@functools.lru_cache(maxsize=64)
def _cached_orders(directions: tuple[str, ...], height: int, width: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # cached across calls, so never an inference tensor (autograd could not save it)
    with torch.inference_mode(False):
        return _build_orders(directions, height, width, device)


def _orders(directions: tuple[str, ...], height: int, width: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        # traced into the graph instead: a Python-level cache is invisible to compiled code
        return _build_orders(directions, height, width, device)
    return _cached_orders(directions, height, width, device)


def _gather_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, g, k, t] = x[b, g, k, index[g, t]]`` for ``x`` of shape ``(B, G, K, L)``."""
    batch, groups, channels, length = x.shape
    return torch.gather(x, 3, index.view(1, groups, 1, length).expand(batch, groups, channels, length))


class _ReorderSteps(torch.autograd.Function):
    """:func:`_gather_steps` with a gather as its backward too.

    ``index`` is a permutation per group, so the gradient is the gather with its
    inverse; autograd's generic gather backward would zero a buffer and
    scatter-add into it (atomics on the GPU) instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return _gather_steps(x, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _gather_steps(grad, inverse), None, None


def reference(u, delta, A, B, C, D, delta_bias, directions: Sequence[str], height: int, width: int,
              backend: str = "auto") -> torch.Tensor:
    """:func:`selective_scan_grid` by gathering into scan order, with a sequence scan
    ``backend`` of :mod:`kernels.selective_scan` (``auto``, ``triton``, ``cuda``, ``torch``)."""
    _check_shapes(u, delta, A, B, C, D, delta_bias, directions, height, width)
    batch, length, dim = u.shape
    groups = len(directions)
    order, inverse = _orders(tuple(directions), height, width, u.device)

    def to_scan_order(t: torch.Tensor) -> torch.Tensor:  # (batch, L, G * k) -> (batch, G, k, L)
        return _ReorderSteps.apply(t.reshape(batch, length, groups, -1).permute(0, 2, 3, 1), order, inverse)

    ys = selective_scan_fn(to_scan_order(u).reshape(batch, dim, length),
                           to_scan_order(delta).reshape(batch, dim, length),
                           _fp32(A), to_scan_order(B), to_scan_order(C), _fp32(D), _fp32(delta_bias),
                           delta_softplus=True, backend=backend)
    ys = _ReorderSteps.apply(ys.view(batch, groups, dim // groups, length), inverse, order)
    return ys.permute(0, 3, 1, 2).reshape(batch, length, dim)


def selective_scan_grid(u, delta, A, B, C, D, delta_bias, directions: Sequence[str], height: int,
                        width: int, backend: str = "auto") -> torch.Tensor:
    """``y = scan(u, softplus(delta + delta_bias), A, B, C) + D u`` with group ``g`` in ``directions[g]``.

    Shapes in the module docstring; ``backend`` one of :data:`SCAN_BACKENDS`, resolved
    by :func:`resolve_backend`. Returns float32 (float64 for float64 inputs)
    ``(batch, H * W, G * K)``.
    """
    name = resolve_backend(backend, u.device, A.shape[-1], u.dtype)
    if name == "grid":
        return fused_scan(u, delta, A, B, C, D, delta_bias, directions, height, width)
    return reference(u, delta, A, B, C, D, delta_bias, directions, height, width, name)
