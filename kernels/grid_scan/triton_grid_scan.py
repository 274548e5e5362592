"""Triton kernels: the selective scan (one state, N = 1) read straight from channels-last maps.

Importing this module without Triton, or without a CUDA device, raises
``ImportError`` with the reason. ``TRITON_INTERPRET=1`` lifts the CUDA
requirement so the kernels can be checked on CPU tensors (slow; small shapes).

Layout: ``u`` and ``delta`` are ``(batch, L, G * K)``, positions row-major over
the ``H x W`` grid and the channels of group ``g`` in ``[g K, (g + 1) K)``, each
with a unit channel stride; ``B`` and ``C`` are ``(batch, L, G)`` (one state).
Group ``g`` reads the grid in its own order, a 2-bit code: bit 0 column-major,
bit 1 reversed (:data:`DIRECTION_CODES`). A program owns one batch element and a
block of one group's channels, and walks that group's order in chunks of
``block_t`` steps: step ``t`` of the order is computed into a grid position,
and the tile ``[block_t, block_c]`` is loaded from those positions (each row a
contiguous run of channels, so the loads stay coalesced). Nothing is gathered
into a sequence layout and back; ``y`` is written at the positions it came from.

The recurrence is the one of :mod:`kernels.selective_scan.triton_scan`, with the
tile transposed (steps along axis 0):

- forward: ``(exp(dt A), dt B u)`` pairs combined by ``tl.associative_scan``
  along the steps, the state entering a chunk carried in registers,
  ``y = C h + D u`` in float32;
- backward: the forward stores the state entering each of the backward's chunks
  (a ``(batch, L / chunk, G K)`` float32 tensor, kept for the backward); the
  chunks are visited last to first, the states within one recomputed from it and
  the adjoint ``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` scanned in reverse. ``dB``/``dC``
  are sums over the group's channels: stored directly when one program holds
  all of them, added with relaxed atomics otherwise. ``dA``, ``dD`` and
  ``ddelta_bias`` are summed over the steps in registers and written per batch
  element; the host adds those partial sums (deterministic).
"""
import torch

from kernels import load_triton

triton, tl = load_triton("the channels-last scan")

from kernels.selective_scan.triton_math import lin_combine as _lin_combine, softplus as _softplus  # noqa: E402

__all__ = ["CONFIG", "backward_chunk", "grid_scan_fwd", "grid_scan_bwd"]

# launch configuration (module-level so that bench/bench_grid_scan.py can sweep it):
# a tile is [block_t, block_c]; block_c at most the group's channels rounded up to
# a power of two; block_t at most L rounded up. The backward keeps ~15 float32
# tiles live. The values are the best of a launch-setting sweep on an H200
# (bench/bench_grid_scan.py), weighted over groupmamba_tiny's four stage shapes:
# small tiles, i.e. more programs, win.
CONFIG = {"fwd_block_t": 32, "fwd_block_c": 16, "fwd_warps": 4,
          "bwd_block_t": 64, "bwd_block_c": 8, "bwd_warps": 4}


@triton.jit
def _grid_positions(t, L, H, W, code):
    """Row-major grid position of step ``t`` of the order ``code`` (``t`` clamped to ``L - 1``)."""
    s = tl.minimum(t, L - 1)
    s = tl.where((code & 2) != 0, L - 1 - s, s)
    return tl.where((code & 1) != 0, (s % H) * W + s // H, s)


@triton.jit
def _program_tile(A_ptr, D_ptr, bias_ptr, K, G, codes, n_tiles, BLOCK_C: tl.constexpr):
    """This program's batch element, group, the group's order, its channels and their
    ``A``, ``D`` and ``delta_bias``."""
    pid = tl.program_id(0)
    tile = pid % n_tiles
    bg = pid // n_tiles
    group = bg % G
    b = (bg // G).to(tl.int64)
    code = (codes >> (2 * group)) & 3
    c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < K
    ch = group * K + c
    a = tl.load(A_ptr + ch, mask=c_ok, other=0.0)
    d = tl.load(D_ptr + ch, mask=c_ok, other=0.0)
    bias = tl.load(bias_ptr + ch, mask=c_ok, other=0.0)
    return b, group, code, ch, c_ok, a, d, bias


@triton.jit
def _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, bias, a, b, t, L, H, W, code, ch, c_ok,
                su_b, su_l, sd_b, sd_l, sB_b, sB_l, sC_b, sC_l, group):
    """The chunk of steps ``t``: their grid positions, validity (steps, tile) and inputs in
    float32: ``u``, the raw ``delta + bias``, ``dt``, ``B``, ``C``, the decay."""
    t_ok = t < L
    pos = _grid_positions(t, L, H, W, code)
    m = t_ok[:, None] & c_ok[None, :]
    u = tl.load(u_ptr + b * su_b + pos[:, None] * su_l + ch[None, :], mask=m, other=0.0).to(tl.float32)
    x = tl.load(delta_ptr + b * sd_b + pos[:, None] * sd_l + ch[None, :], mask=m, other=0.0).to(tl.float32)
    x = x + bias[None, :]
    dt = tl.where(m, _softplus(x), 0.0)  # padded steps: dt = 0, an identity step
    Bv = tl.load(B_ptr + b * sB_b + pos * sB_l + group, mask=t_ok, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * sC_b + pos * sC_l + group, mask=t_ok, other=0.0).to(tl.float32)
    return t_ok, pos, m, u, x, dt, Bv, Cv, tl.exp(dt * a[None, :])


@triton.jit
def _decay_next(delta_ptr, bias, a, b, t, L, H, W, code, ch, c_ok, sd_b, sd_l):
    """``exp(dt_{t+1} A)``, the decay that carries the adjoint ``g_{t+1}`` back to step ``t``
    (zero past the last step)."""
    m_next = (t + 1 < L)[:, None] & c_ok[None, :]
    pos_next = _grid_positions(t + 1, L, H, W, code)
    x_next = tl.load(delta_ptr + b * sd_b + pos_next[:, None] * sd_l + ch[None, :], mask=m_next,
                     other=0.0).to(tl.float32)
    return tl.where(m_next, tl.exp(_softplus(x_next + bias[None, :]) * a[None, :]), 0.0)


@triton.jit
def _grid_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, state_ptr,
                     su_b, su_l, sd_b, sd_l, sB_b, sB_l, sC_b, sC_l,
                     L, H, W, K, G, codes, n_tiles, state_t, n_state_chunks,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SAVE_STATES: tl.constexpr):
    b, group, code, ch, c_ok, a, d, bias = _program_tile(A_ptr, D_ptr, bias_ptr, K, G, codes, n_tiles, BLOCK_C)
    dim = G * K
    steps = tl.arange(0, BLOCK_T)
    h_carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, L, BLOCK_T):
        t = start + steps
        t_ok, pos, m, u, x, dt, Bv, Cv, decay = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias, a, b, t, L, H, W, code, ch, c_ok,
            su_b, su_l, sd_b, sd_l, sB_b, sB_l, sC_b, sC_l, group)
        acc_a, acc_b = tl.associative_scan((decay, dt * Bv[:, None] * u), axis=0, combine_fn=_lin_combine)
        h = acc_a * h_carry[None, :] + acc_b
        # padded steps are identities, so the last row is the chunk's final state
        h_carry = tl.sum(tl.where(steps[:, None] == BLOCK_T - 1, h, 0.0), axis=0)
        y = Cv[:, None] * h + d[None, :] * u
        tl.store(y_ptr + (b * L + pos[:, None]) * dim + ch[None, :], y, mask=m)
        if SAVE_STATES:
            # the state entering each of the backward's chunks of state_t steps (but the first)
            following = t + 1
            boundary = (following % state_t == 0) & (following < L)
            chunk = following // state_t
            tl.store(state_ptr + (b * n_state_chunks + chunk[:, None]) * dim + ch[None, :], h,
                     mask=boundary[:, None] & c_ok[None, :])
            # and zero entering the first, so that every element of the output is written
            tl.store(state_ptr + b * n_state_chunks * dim + ch[None, :] + 0 * t[:, None], 0.0 * h,
                     mask=(t == 0)[:, None] & c_ok[None, :])


@triton.jit
def _grid_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr,
                     du_ptr, ddelta_ptr, dB_ptr, dC_ptr, part_ptr, state_ptr,
                     su_b, su_l, sd_b, sd_l, sB_b, sB_l, sC_b, sC_l,
                     batch, L, H, W, K, G, codes, n_tiles, n_chunks,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ATOMIC_BC: tl.constexpr):
    b, group, code, ch, c_ok, a, d, bias = _program_tile(A_ptr, D_ptr, bias_ptr, K, G, codes, n_tiles, BLOCK_C)
    dim = G * K
    steps = tl.arange(0, BLOCK_T)

    # chunks last to first, from the state entering each that the forward stored
    g_carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        t = k * BLOCK_T + steps
        t_ok, pos, m, u, x, dt, Bv, Cv, decay = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias, a, b, t, L, H, W, code, ch, c_ok,
            su_b, su_l, sd_b, sd_l, sB_b, sB_l, sC_b, sC_l, group)
        out_off = (b * L + pos[:, None]) * dim + ch[None, :]
        dy = tl.load(dy_ptr + out_off, mask=m, other=0.0)
        decay_next = _decay_next(delta_ptr, bias, a, b, t, L, H, W, code, ch, c_ok, sd_b, sd_l)

        h0 = tl.load(state_ptr + (b * n_chunks + k) * dim + ch, mask=c_ok & (k > 0), other=0.0)
        drive = dt * Bv[:, None] * u
        acc_a, acc_b = tl.associative_scan((decay, drive), axis=0, combine_fn=_lin_combine)
        h = acc_a * h0[None, :] + acc_b
        rev_a, rev_b = tl.associative_scan((decay_next, Cv[:, None] * dy), axis=0,
                                           combine_fn=_lin_combine, reverse=True)
        g = rev_b + rev_a * g_carry[None, :]
        g_carry = tl.sum(tl.where(steps[:, None] == 0, g, 0.0), axis=0)

        h_prev_decayed = h - drive  # exp(dt_t A) h_{t-1}
        g_dt = g * dt
        dA_acc += tl.sum(g_dt * h_prev_decayed, axis=0)
        dD_acc += tl.sum(dy * u, axis=0)
        ddelta = g * (Bv[:, None] * u + a[None, :] * h_prev_decayed) * tl.sigmoid(x)
        ddelta = tl.where(m, ddelta, 0.0)
        dbias_acc += tl.sum(ddelta, axis=0)
        du = g_dt * Bv[:, None] + d[None, :] * dy
        tl.store(du_ptr + out_off, du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(ddelta_ptr + out_off, ddelta.to(ddelta_ptr.dtype.element_ty), mask=m)

        bc_off = (b * L + pos) * G + group
        dB = tl.sum(g_dt * u, axis=1)
        dC = tl.sum(dy * h, axis=1)
        if ATOMIC_BC:
            tl.atomic_add(dB_ptr + bc_off, dB, mask=t_ok, sem="relaxed")
            tl.atomic_add(dC_ptr + bc_off, dC, mask=t_ok, sem="relaxed")
        else:
            tl.store(dB_ptr + bc_off, dB.to(dB_ptr.dtype.element_ty), mask=t_ok)
            tl.store(dC_ptr + bc_off, dC.to(dC_ptr.dtype.element_ty), mask=t_ok)

    # partial sums per batch element; the host adds them up
    part = b * dim + ch
    tl.store(part_ptr + part, dA_acc, mask=c_ok)
    tl.store(part_ptr + batch * dim + part, dD_acc, mask=c_ok)
    tl.store(part_ptr + 2 * batch * dim + part, dbias_acc, mask=c_ok)


# ----------------------------------------------------------------------------------
# host wrappers
# ----------------------------------------------------------------------------------

def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _blocks(kind: str, length: int, per_group: int) -> tuple[int, int, int]:
    block_c = min(CONFIG[f"{kind}_block_c"], _pow2(per_group))
    block_t = max(16, min(CONFIG[f"{kind}_block_t"], _pow2(length)))
    return block_t, block_c, CONFIG[f"{kind}_warps"]


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _shape(u: torch.Tensor, B: torch.Tensor) -> tuple[int, int, int, int]:
    batch, length, dim = u.shape
    groups = B.shape[-1]
    return batch, length, dim, groups


def backward_chunk(length: int, per_group: int) -> int:
    """Steps a backward chunk takes; the forward stores the state entering each."""
    return _blocks("bwd", length, per_group)[0]


def grid_scan_fwd(u, delta, A, B, C, D, delta_bias, codes: int, height: int, width: int,
                  state_t: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` (float32, contiguous ``(batch, L, G K)``) and, with ``state_t`` > 0, the
    states entering each chunk of ``state_t`` steps (float32 ``(batch, chunks, G K)``,
    for :func:`grid_scan_bwd`; empty otherwise). Inputs as in the module docstring."""
    batch, length, dim, groups = _shape(u, B)
    per_group = dim // groups
    y = torch.empty((batch, length, dim), dtype=torch.float32, device=u.device)
    n_state_chunks = triton.cdiv(length, state_t) if state_t else 0
    states = torch.empty((batch, n_state_chunks, dim), dtype=torch.float32, device=u.device)
    if y.numel() == 0:
        return y, states.zero_()
    block_t, block_c, warps = _blocks("fwd", length, per_group)
    n_tiles = triton.cdiv(per_group, block_c)
    n_prog = batch * groups * n_tiles
    strides = (*_row_strides(u), *_row_strides(delta), *_row_strides(B), *_row_strides(C))
    _grid_fwd_kernel[(n_prog,)](
        u, delta, A, B, C, D, delta_bias, y, states, *strides,
        length, height, width, per_group, groups, codes, n_tiles, max(state_t, 1), n_state_chunks,
        BLOCK_T=block_t, BLOCK_C=block_c, SAVE_STATES=state_t > 0, num_warps=warps)
    return y, states


def grid_scan_bwd(dy, u, delta, A, B, C, D, delta_bias, states, codes: int, height: int, width: int,
                  state_t: int):
    """``(du, ddelta, dA, dB, dC, dD, ddelta_bias)`` from the forward's ``states`` (one
    every ``state_t`` steps, the backward's chunk length): ``du``/
    ``ddelta`` contiguous in the dtypes of ``u``/``delta``, ``dB``/``dC`` contiguous
    ``(batch, L, G)`` in ``B``'s and ``C``'s dtypes, the parameter gradients float32 in
    the parameters' shapes."""
    batch, length, dim, groups = _shape(u, B)
    per_group = dim // groups
    dev = u.device
    f32 = torch.float32
    du = torch.empty((batch, length, dim), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, length, dim), dtype=delta.dtype, device=dev)
    _, block_c, warps = _blocks("bwd", length, per_group)
    n_chunks = states.shape[1]
    n_tiles = triton.cdiv(per_group, block_c)
    atomic = n_tiles > 1
    dB = (torch.zeros if atomic else torch.empty)((batch, length, groups), dtype=f32 if atomic else B.dtype,
                                                  device=dev)
    dC = (torch.zeros if atomic else torch.empty)((batch, length, groups), dtype=f32 if atomic else C.dtype,
                                                  device=dev)
    partial_sums = torch.zeros((3, batch, dim), dtype=f32, device=dev)
    if du.numel() > 0:
        n_prog = batch * groups * n_tiles
        _grid_bwd_kernel[(n_prog, 1)](
            u, delta, A, B, C, D, delta_bias, dy,
            du, ddelta, dB, dC, partial_sums, states,
            *_row_strides(u), *_row_strides(delta), *_row_strides(B), *_row_strides(C),
            batch, length, height, width, per_group, groups, codes, n_tiles, n_chunks,
            BLOCK_T=state_t, BLOCK_C=block_c, ATOMIC_BC=atomic, num_warps=warps)
    dA, dD, dbias = (part.sum(0) for part in partial_sums)  # separate tensors: op outputs may not alias
    return (du, ddelta, dA.view(A.shape).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.to(D.dtype), dbias.to(delta_bias.dtype))
