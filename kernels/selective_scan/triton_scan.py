"""Triton backend of the selective scan: forward and backward kernels, no build step.

Importing this module without Triton, or without a CUDA device, raises
``ImportError`` with the reason (the dispatcher records it and falls back).
``TRITON_INTERPRET=1`` lifts the CUDA requirement so the kernels can be checked
on CPU tensors with Triton's interpreter (slow; small shapes only).

Algorithm (one program = ``CPB`` channels of one batch element, all ``N`` states):

- the program holds a ``[CPB * NP, BLOCK_L]`` tile, one row per (channel, state)
  pair, and walks L in chunks of ``BLOCK_L``;
- forward: ``(exp(dt*A), dt*B*u)`` pairs are combined by ``tl.associative_scan``
  along L (the linear-recurrence monoid ``(a1, b1) o (a2, b2) = (a1 a2, b1 a2 + b2)``);
  the state entering a chunk is carried in registers; ``y = sum_n C*h + D*u``;
- backward: the adjoint ``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` is the same
  monoid scanned in reverse. Chunks are visited last to first; the forward state
  entering each chunk comes from a first forward pass that stores it to a small
  scratch buffer (only when L needs more than one chunk). The product
  ``exp(dt_t A) h_{t-1}`` is taken as ``h_t - dt_t B_t u_t``, so no shifted
  state is needed. The programs of one group sum dB/dC over their channels in
  registers and add the result to fp32 buffers with relaxed atomics; dA, dD and
  ddelta_bias are reduced the same way.

See ``_ops.scan_bwd_explicit`` for the gradient formulas written out in PyTorch.
"""
from typing import NamedTuple, Optional

import torch

from kernels import INTERPRETING, load_triton

triton, tl = load_triton("the Triton scan backend")

from ._ops import define_scan_op, output_dtype  # noqa: E402

from .triton_math import lin_combine as _lin_combine, softplus as _softplus  # noqa: E402

__all__ = ["selective_scan_triton", "ScanConfig", "fwd_config", "bwd_config", "candidate_configs"]


# ----------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------

@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr,
    DIM, L, N, G, CPG, n_tiles,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CPB: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr,
):
    R: tl.constexpr = CPB * NP
    pid = tl.program_id(0)
    b = (pid // n_tiles).to(tl.int64)
    c0 = (pid % n_tiles) * CPB

    r = tl.arange(0, R)
    ch = c0 + r // NP  # channel of each row
    n = r % NP  # state index of each row
    row_ok = (ch < DIM) & (n < N)
    grp = ch // CPG
    a_row = tl.load(A_ptr + ch * N + n, mask=row_ok, other=0.0).to(tl.float32)
    io_row = (b * DIM + ch) * L
    bc_row = ((b * G + grp) * N + n) * L
    if HAS_BIAS:
        bias_row = tl.load(bias_ptr + ch, mask=row_ok, other=0.0).to(tl.float32)

    # one row per channel for the output (identical to the rows when NP == 1)
    cc = c0 + tl.arange(0, CPB)
    c_ok = cc < DIM
    io_ch = (b * DIM + cc) * L
    if HAS_D:
        d_ch = tl.load(D_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)

    cols = tl.arange(0, BLOCK_L)
    h_carry = tl.zeros([R], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        t = start + cols
        t_ok = t < L
        m = row_ok[:, None] & t_ok[None, :]
        u = tl.load(u_ptr + io_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(delta_ptr + io_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = x + bias_row[:, None]
        if SOFTPLUS:
            x = _softplus(x)
        dt = tl.where(m, x, 0.0)
        Bv = tl.load(B_ptr + bc_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + bc_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)

        decay = tl.exp(dt * a_row[:, None])
        drive = dt * Bv * u
        acc_a, acc_b = tl.associative_scan((decay, drive), axis=1, combine_fn=_lin_combine)
        h = acc_a * h_carry[:, None] + acc_b
        # padded columns are identity steps, so the last column is the chunk's final state
        h_carry = tl.sum(tl.where(cols[None, :] == BLOCK_L - 1, h, 0.0), axis=1)

        if NP == 1:
            y = Cv * h
            if HAS_D:
                y = y + d_ch[:, None] * u
            tl.store(y_ptr + io_row[:, None] + t[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
        else:
            y = tl.sum(tl.reshape(Cv * h, (CPB, NP, BLOCK_L)), axis=1)
            mc = c_ok[:, None] & t_ok[None, :]
            if HAS_D:
                uc = tl.load(u_ptr + io_ch[:, None] + t[None, :], mask=mc, other=0.0).to(tl.float32)
                y = y + d_ch[:, None] * uc
            tl.store(y_ptr + io_ch[:, None] + t[None, :], y.to(y_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, state_ptr,
    DIM, L, N, G, CPG, n_tiles, n_chunks,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CPB: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr,
):
    R: tl.constexpr = CPB * NP
    pid = tl.program_id(0)
    bg = (pid // n_tiles).to(tl.int64)  # b * G + group
    tile = pid % n_tiles
    b = bg // G
    grp = bg % G

    r = tl.arange(0, R)
    cl = tile * CPB + r // NP  # channel index inside the group
    n = r % NP
    row_ok = (cl < CPG) & (n < N)
    ch = grp * CPG + cl
    a_row = tl.load(A_ptr + ch * N + n, mask=row_ok, other=0.0).to(tl.float32)
    io_row = (b * DIM + ch) * L
    bc_row = (bg * N + n) * L
    if HAS_BIAS:
        bias_row = tl.load(bias_ptr + ch, mask=row_ok, other=0.0).to(tl.float32)
    st_base = pid.to(tl.int64) * n_chunks * R

    ccl = tile * CPB + tl.arange(0, CPB)
    c_ok = ccl < CPG
    cc = grp * CPG + ccl
    io_ch = (b * DIM + cc) * L
    if HAS_D:
        d_ch = tl.load(D_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias_ch = tl.load(bias_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)

    nn = tl.arange(0, NP)
    cols = tl.arange(0, BLOCK_L)

    # pass 1: the forward state entering every chunk but the first
    if n_chunks > 1:
        h_carry = tl.zeros([R], dtype=tl.float32)
        for k in range(0, n_chunks - 1):
            t = k * BLOCK_L + cols
            m = row_ok[:, None] & (t < L)[None, :]
            u = tl.load(u_ptr + io_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
            x = tl.load(delta_ptr + io_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x = x + bias_row[:, None]
            if SOFTPLUS:
                x = _softplus(x)
            dt = tl.where(m, x, 0.0)
            Bv = tl.load(B_ptr + bc_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
            acc_a, acc_b = tl.associative_scan((tl.exp(dt * a_row[:, None]), dt * Bv * u), axis=1,
                                               combine_fn=_lin_combine)
            h = acc_a * h_carry[:, None] + acc_b
            h_carry = tl.sum(tl.where(cols[None, :] == BLOCK_L - 1, h, 0.0), axis=1)
            tl.store(state_ptr + st_base + (k + 1) * R + r, h_carry)
        tl.debug_barrier()  # make the stored states visible to every thread of the program

    # pass 2: chunks last to first
    g_carry = tl.zeros([R], dtype=tl.float32)
    dA_acc = tl.zeros([R], dtype=tl.float32)
    dD_acc = tl.zeros([CPB], dtype=tl.float32)
    dbias_acc = tl.zeros([CPB], dtype=tl.float32)
    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        t = k * BLOCK_L + cols
        t_ok = t < L
        m = row_ok[:, None] & t_ok[None, :]
        u = tl.load(u_ptr + io_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(delta_ptr + io_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + io_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + bc_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + bc_row[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
        # delta one step ahead, for the decay that carries g_{t+1} back to t
        m_next = row_ok[:, None] & (t + 1 < L)[None, :]
        x_next = tl.load(delta_ptr + io_row[:, None] + (t + 1)[None, :], mask=m_next,
                         other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = x + bias_row[:, None]
            x_next = x_next + bias_row[:, None]
        if SOFTPLUS:
            dt = tl.where(m, _softplus(x), 0.0)
            dt_next = _softplus(x_next)
        else:
            dt = tl.where(m, x, 0.0)
            dt_next = x_next
        decay_next = tl.where(m_next, tl.exp(dt_next * a_row[:, None]), 0.0)

        h0 = tl.load(state_ptr + st_base + k * R + r, mask=row_ok & (k > 0), other=0.0)
        drive = dt * Bv * u
        acc_a, acc_b = tl.associative_scan((tl.exp(dt * a_row[:, None]), drive), axis=1,
                                           combine_fn=_lin_combine)
        h = acc_a * h0[:, None] + acc_b
        rev_a, rev_b = tl.associative_scan((decay_next, Cv * dy), axis=1, combine_fn=_lin_combine,
                                           reverse=True)
        g = rev_b + rev_a * g_carry[:, None]
        g_carry = tl.sum(tl.where(cols[None, :] == 0, g, 0.0), axis=1)

        h_prev_decayed = h - drive  # exp(dt_t A) h_{t-1}
        g_dt = g * dt
        dA_acc += tl.sum(g_dt * h_prev_decayed, axis=1)
        ddt_rows = g * (Bv * u + a_row[:, None] * h_prev_decayed)
        du_rows = g_dt * Bv
        dB_rows = g_dt * u
        dC_rows = dy * h

        if NP == 1:
            ddt = ddt_rows
            du = du_rows
            dyc = dy
            uc = u
            xc = x
            dB_sum = tl.sum(dB_rows, axis=0)
            dC_sum = tl.sum(dC_rows, axis=0)
            bc_off = bg * N * L + t
            bc_mask = t_ok
        else:
            ddt = tl.sum(tl.reshape(ddt_rows, (CPB, NP, BLOCK_L)), axis=1)
            du = tl.sum(tl.reshape(du_rows, (CPB, NP, BLOCK_L)), axis=1)
            mc = c_ok[:, None] & t_ok[None, :]
            dyc = tl.load(dy_ptr + io_ch[:, None] + t[None, :], mask=mc, other=0.0).to(tl.float32)
            uc = tl.load(u_ptr + io_ch[:, None] + t[None, :], mask=mc, other=0.0).to(tl.float32)
            xc = tl.load(delta_ptr + io_ch[:, None] + t[None, :], mask=mc, other=0.0).to(tl.float32)
            if HAS_BIAS:
                xc = xc + bias_ch[:, None]
            dB_sum = tl.sum(tl.reshape(dB_rows, (CPB, NP, BLOCK_L)), axis=0)
            dC_sum = tl.sum(tl.reshape(dC_rows, (CPB, NP, BLOCK_L)), axis=0)
            bc_off = (bg * N + nn)[:, None] * L + t[None, :]
            bc_mask = (nn < N)[:, None] & t_ok[None, :]

        if HAS_D:
            du = du + d_ch[:, None] * dyc
            dD_acc += tl.sum(dyc * uc, axis=1)
        if SOFTPLUS:
            ddelta = ddt * tl.sigmoid(xc)
        else:
            ddelta = ddt
        if HAS_BIAS:
            dbias_acc += tl.sum(ddelta, axis=1)
        mc_out = c_ok[:, None] & t_ok[None, :]
        out_off = io_ch[:, None] + t[None, :]
        tl.store(du_ptr + out_off, du.to(du_ptr.dtype.element_ty), mask=mc_out)
        tl.store(ddelta_ptr + out_off, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mc_out)
        tl.atomic_add(dB_ptr + bc_off, dB_sum, mask=bc_mask, sem="relaxed")
        tl.atomic_add(dC_ptr + bc_off, dC_sum, mask=bc_mask, sem="relaxed")

    tl.atomic_add(dA_ptr + ch * N + n, dA_acc, mask=row_ok, sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + cc, dD_acc, mask=c_ok, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + cc, dbias_acc, mask=c_ok, sem="relaxed")


# ----------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------

class ScanConfig(NamedTuple):
    cpb: int  # channels per program
    block_l: int  # chunk length (power of two)
    num_warps: int


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _pick(length: int, n_state: int, channels: int, max_block: int, per_thread: int,
          max_rows: int) -> ScanConfig:
    """Chunk, channels per program and warps for a tile of ``per_thread`` elements a thread.

    The register use of these kernels grows with the elements a thread holds and with
    the rows of the tile (ptxas on sm_90: the forward needs about 10 registers per
    element, the backward about 25), so tiles stay small and long rows are walked in
    chunks rather than widened.
    """
    np2 = _pow2(n_state)
    block_l = max(16, min(_pow2(length), max(16, max_block // np2)))
    cpb = 1
    if np2 == 1 and block_l < 256:  # short rows: several channels per program
        cpb = max(1, min(max_rows, 256 // block_l, _pow2(channels)))
    elems = cpb * np2 * block_l
    num_warps = max(1, min(16, elems // (32 * per_thread)))
    return ScanConfig(cpb, block_l, num_warps)


# the longest chunk of steps one program scans (module-level so that a benchmark can
# change it): forward; backward, on rows of 2048 steps or more and on shorter rows
CONFIG = {"fwd_block": 1024, "bwd_block_long_rows": 512, "bwd_block": 1024}


def fwd_config(length: int, n_state: int, dim: int) -> ScanConfig:
    """Forward: chunks of up to 1024 steps, 8 elements a thread (best on an H200 at
    every GroupMamba stage shape, bench/bench_scan.py --sweep)."""
    return _pick(length, n_state, dim, CONFIG["fwd_block"], 8, 4)


def bwd_config(length: int, n_state: int, per_group: int) -> ScanConfig:
    """Backward: 4 elements a thread (it keeps ~15 tiles live); chunks of 512 steps on
    long rows, up to 1024 otherwise; at most 2 channels a program (H200 sweep)."""
    max_block = CONFIG["bwd_block_long_rows"] if length >= 2048 else CONFIG["bwd_block"]
    return _pick(length, n_state, per_group, max_block, 4, 2)


def candidate_configs(length: int, n_state: int, kind: str):
    """Launch configurations worth timing for one row length (benchmark sweeps, tests)."""
    np2 = _pow2(n_state)
    blocks = (1024, 2048, 4096) if kind == "fwd" else (256, 512, 1024, 2048)
    per_thread = (8, 4) if kind == "fwd" else (4, 2)
    seen, out = set(), []
    for cap in blocks:
        block_l = max(16, min(_pow2(length), max(16, cap // np2)))
        for cpb in ((1, 2, 4) if block_l <= 256 and np2 == 1 else (1,)):
            for ept in per_thread:
                warps = max(1, min(16, cpb * np2 * block_l // (32 * ept)))
                cfg = ScanConfig(cpb, block_l, warps)
                if cfg not in seen:
                    seen.add(cfg)
                    out.append(cfg)
    return out


# ----------------------------------------------------------------------------------
# host wrappers
# ----------------------------------------------------------------------------------

def _c(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, config: Optional[ScanConfig] = None):
    u, delta, A, B, C, D, delta_bias = map(_c, (u, delta, A, B, C, D, delta_bias))
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    y = torch.empty(u.shape, dtype=output_dtype(u, delta, A, B, C, D, delta_bias), device=u.device)
    if y.numel() == 0:
        return y
    cfg = config or fwd_config(length, n_state, dim)
    n_tiles = triton.cdiv(dim, cfg.cpb)
    _scan_fwd_kernel[(batch * n_tiles,)](
        u, delta, A, B, C, D if D is not None else u, delta_bias if delta_bias is not None else u, y,
        dim, length, n_state, groups, dim // groups, n_tiles,
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        CPB=cfg.cpb, NP=_pow2(n_state), BLOCK_L=cfg.block_l, num_warps=cfg.num_warps)
    return y


def _bwd(dout, u, delta, A, B, C, D, delta_bias, delta_softplus,
         config: Optional[ScanConfig] = None):
    dout, u, delta, A, B, C, D, delta_bias = map(_c, (dout, u, delta, A, B, C, D, delta_bias))
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    per_group = dim // groups
    dev = u.device
    f32 = torch.float32
    du = torch.empty(u.shape, dtype=u.dtype, device=dev)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=dev)
    dA = torch.zeros(A.shape, dtype=f32, device=dev)
    dB = torch.zeros(B.shape, dtype=f32, device=dev)
    dC = torch.zeros(C.shape, dtype=f32, device=dev)
    dD = torch.zeros((dim if D is not None else 0,), dtype=f32, device=dev)
    dbias = torch.zeros((dim if delta_bias is not None else 0,), dtype=f32, device=dev)
    if u.numel() > 0:
        cfg = config or bwd_config(length, n_state, per_group)
        np2 = _pow2(n_state)
        n_tiles = triton.cdiv(per_group, cfg.cpb)
        n_chunks = triton.cdiv(length, cfg.block_l)
        n_prog = batch * groups * n_tiles
        state = (torch.empty(n_prog * n_chunks * cfg.cpb * np2, dtype=f32, device=dev)
                 if n_chunks > 1 else dA)
        _scan_bwd_kernel[(n_prog,)](
            u, delta, A, B, C, D if D is not None else u,
            delta_bias if delta_bias is not None else u, dout,
            du, ddelta, dA, dB, dC, dD, dbias, state,
            dim, length, n_state, groups, per_group, n_tiles, n_chunks,
            HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            CPB=cfg.cpb, NP=np2, BLOCK_L=cfg.block_l, num_warps=cfg.num_warps)
    return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.to(D.dtype) if D is not None else dD,
            dbias.to(delta_bias.dtype) if delta_bias is not None else dbias)


selective_scan_triton = define_scan_op(
    "triton", _fwd, _bwd, device_types=None if INTERPRETING else "cuda")
