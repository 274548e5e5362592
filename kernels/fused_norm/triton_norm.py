"""Triton kernels: GroupMamba's LayerNorms fused with the elementwise work around them.

Modulated norm, the end of a ``GroupMambaLayer`` before its projection::

    p = mixed * skip_scale * grid * gate          (gate broadcast over the tokens)
    y = LayerNorm(p) * weight + bias              (over the C channels of a token)

Gated group norm, the end of the grouped SS2D pipeline before ``out_proj``::

    y[..., g, :] = (LayerNorm(ys[..., g, :]) * weight[g] + bias[g]) * silu(z[..., g, :])

Importing this module without Triton, or without a CUDA device, raises
``ImportError`` with the reason. ``TRITON_INTERPRET=1`` lifts the CUDA requirement so
the kernels can be checked on CPU tensors (slow; small shapes).

Pooled norm, the start of a ``GroupMambaLayer``: its LayerNorm and the mean token that
its channel-affinity gate reads::

    y = LayerNorm(x) * weight + bias;  pooled[b] = mean over the tokens of y[b]

Residual norm, a block's residual sum and the LayerNorm of its feed-forward::

    total = x + branch * keep                     (keep: one factor per image, stochastic depth)
    y = LayerNorm(total) * weight + bias          (both total and y are outputs)

Layout: tokens are rows, channels are contiguous. A program owns ``ROWS`` tokens and
all channels of one normalised group (C of the modulated norm, padded to a power of
two; one group's D of the gated norm), so a token's statistics are a reduction inside
the program. Everything is computed in float32.

- forward: one pass, the output in the requested dtype; nothing but the inputs is kept
  for the backward (no products, no statistics);
- backward: one pass recomputes the products and statistics from the inputs and writes
  the full-size input gradients; the gradients that are sums over tokens (the
  parameters', the modulated norm's gate per image) are written as one row of partial
  sums per program and added up on the host (deterministic, no atomics).
"""

import torch

from kernels import load_triton

triton, tl = load_triton("the fused LayerNorms")

__all__ = ["modulated_norm_fwd", "modulated_norm_bwd", "gated_norm_fwd", "gated_norm_bwd", "pooled_norm_fwd",
           "pooled_norm_bwd", "residual_norm_fwd", "residual_norm_bwd", "CONFIG"]

# a program's tile is ROWS x (its channels rounded up to a power of two) float32
# values: about ``tile`` of them, over ``warps`` warps (16 values a thread a tile: the
# backward holds about eight tiles); a first choice, not a swept best: bench/bench_fused_norm.py
# times the kernels
CONFIG = {"tile": 4096, "warps": 8}


@triton.jit
def _normalise(product, mask, C, eps):
    mean = tl.sum(product, axis=1) / C
    centred = tl.where(mask, product - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    return centred * rstd[:, None], rstd


@triton.jit
def _normalise_backward(dnormed, normed, rstd, C):
    """The LayerNorm's input gradient from its normalised output's: ``rstd * (dn - mean(dn)
    - n * mean(dn * n))`` per token."""
    mean_dn = tl.sum(dnormed, axis=1) / C
    mean_dn_n = tl.sum(dnormed * normed, axis=1) / C
    return (dnormed - mean_dn[:, None] - normed * mean_dn_n[:, None]) * rstd[:, None]


@triton.jit
def _store_affine_sums(row, cols, col_ok, daffine, normed, BLOCK: tl.constexpr):
    """This program's sums over its tokens of the affine's weight and bias gradients, at
    ``row`` and ``row + BLOCK``."""
    tl.store(row + cols, tl.sum(daffine * normed, axis=0), mask=col_ok)
    tl.store(row + BLOCK + cols, tl.sum(daffine, axis=0), mask=col_ok)


@triton.jit
def _image_rows(N, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """``ROWS`` tokens of image ``program_id(0)`` (chunk ``program_id(1)``) of ``(B, N, C)``:
    offsets, the mask, the channel indices and their mask."""
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < N)[:, None] & col_ok[None, :]
    return (tl.program_id(0) * N + rows).to(tl.int64)[:, None] * C + cols[None, :], mask, cols, col_ok


@triton.jit
def _load_tile(mixed_ptr, grid_ptr, gate_ptr, scale_ptr, weight_ptr, N, C, eps,
               ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The program's tokens (``ROWS`` of image ``program_id(0)``): offsets, masks, the
    inputs as float32, the product normalised and its rstd, the norm's weight."""
    offsets, mask, cols, col_ok = _image_rows(N, C, ROWS, BLOCK_C)
    batch = tl.program_id(0)
    mixed = tl.load(mixed_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grid = tl.load(grid_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + batch * C + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr).to(tl.float32)
    # the model's order of products: ((mixed * skip_scale) * grid) * gate
    normed, rstd = _normalise(mixed * scale * grid * gate[None, :], mask, C, eps)
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return offsets, mask, cols, col_ok, mixed, grid, gate, scale, normed, rstd, weight


@triton.jit
def _modulated_norm_fwd_kernel(mixed_ptr, grid_ptr, gate_ptr, scale_ptr, weight_ptr, bias_ptr, out_ptr,
                               N, C, eps, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, mask, cols, col_ok, _, _, _, _, normed, _, weight = _load_tile(
        mixed_ptr, grid_ptr, gate_ptr, scale_ptr, weight_ptr, N, C, eps, ROWS, BLOCK_C)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = normed * weight[None, :] + bias[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulated_norm_bwd_kernel(dout_ptr, mixed_ptr, grid_ptr, gate_ptr, scale_ptr, weight_ptr,
                               dmixed_ptr, dgrid_ptr, part_ptr, N, C, eps,
                               ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, mask, cols, col_ok, mixed, grid, gate, scale, normed, rstd, weight = _load_tile(
        mixed_ptr, grid_ptr, gate_ptr, scale_ptr, weight_ptr, N, C, eps, ROWS, BLOCK_C)
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    dproduct = tl.where(mask, _normalise_backward(dout * weight[None, :], normed, rstd, C), 0.0)

    tl.store(dmixed_ptr + offsets, (dproduct * scale * grid * gate[None, :]).to(dmixed_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dgrid_ptr + offsets, (dproduct * mixed * scale * gate[None, :]).to(dgrid_ptr.dtype.element_ty),
             mask=mask)

    # per-program partial sums over the tokens, a row of 4 x BLOCK_C floats:
    # d gate, d weight, d bias, d skip_scale (first column of the last)
    through = tl.sum(dproduct * mixed * grid, axis=0)  # d p / d (skip_scale * gate), summed
    row = part_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * (4 * BLOCK_C)
    tl.store(row + cols, through * scale, mask=col_ok)
    _store_affine_sums(row + BLOCK_C, cols, col_ok, dout, normed, BLOCK_C)
    tl.store(row + 3 * BLOCK_C, tl.sum(through * gate, axis=0))


@triton.jit
def _load_group_tile(ys_ptr, z_ptr, weight_ptr, bias_ptr, tokens, D, z_row_stride, eps,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's tokens of one group: offsets into contiguous ``(tokens, G * D)``,
    the mask, the group's channel indices, ``ys`` normalised and its rstd, the affine
    result, and ``z`` as float32."""
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    rows = (chunk * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < tokens)[:, None] & col_ok[None, :]
    channels = group * D + cols
    offsets = rows[:, None] * (tl.num_programs(1) * D) + channels[None, :]
    ys = tl.load(ys_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * z_row_stride + channels[None, :], mask=mask, other=0.0).to(tl.float32)
    normed, rstd = _normalise(ys, mask, D, eps)
    weight = tl.load(weight_ptr + channels, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channels, mask=col_ok, other=0.0).to(tl.float32)
    return offsets, mask, cols, col_ok, normed, rstd, normed * weight[None, :] + bias[None, :], weight, z


@triton.jit
def _gated_norm_fwd_kernel(ys_ptr, z_ptr, weight_ptr, bias_ptr, out_ptr, tokens, D, z_row_stride, eps,
                           ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    offsets, mask, _, _, _, _, affine, _, z = _load_group_tile(
        ys_ptr, z_ptr, weight_ptr, bias_ptr, tokens, D, z_row_stride, eps, ROWS, BLOCK_D)
    out = affine * (z / (1.0 + tl.exp(-z)))
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_norm_bwd_kernel(dout_ptr, ys_ptr, z_ptr, weight_ptr, bias_ptr, dys_ptr, dz_ptr, part_ptr,
                           tokens, D, z_row_stride, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    offsets, mask, cols, col_ok, normed, rstd, affine, weight, z = _load_group_tile(
        ys_ptr, z_ptr, weight_ptr, bias_ptr, tokens, D, z_row_stride, eps, ROWS, BLOCK_D)
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    sigmoid = 1.0 / (1.0 + tl.exp(-z))
    dz = dout * affine * sigmoid * (1.0 + z * (1.0 - sigmoid))
    tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)

    daffine = tl.where(mask, dout * z * sigmoid, 0.0)
    dys = _normalise_backward(daffine * weight[None, :], normed, rstd, D)
    tl.store(dys_ptr + offsets, dys.to(dys_ptr.dtype.element_ty), mask=mask)

    # per-program partial sums over the tokens: d weight, d bias of this group
    row = part_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * (2 * BLOCK_D)
    _store_affine_sums(row, cols, col_ok, daffine, normed, BLOCK_D)


@triton.jit
def _pooled_norm_fwd_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, part_ptr, N, C, eps,
                            ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, mask, cols, col_ok = _image_rows(N, C, ROWS, BLOCK_C)
    normed, _ = _normalise(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32), mask, C, eps)
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = (normed * weight[None, :] + bias[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, out, mask=mask)
    # the tokens' sum of the output as stored, a row of BLOCK_C per program
    row = part_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * BLOCK_C
    tl.store(row + cols, tl.sum(tl.where(mask, out.to(tl.float32), 0.0), axis=0), mask=col_ok)


@triton.jit
def _pooled_norm_bwd_kernel(dout_ptr, dpooled_ptr, x_ptr, weight_ptr, dx_ptr, part_ptr, N, C, eps,
                            ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, mask, cols, col_ok = _image_rows(N, C, ROWS, BLOCK_C)
    normed, rstd = _normalise(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32), mask, C, eps)
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # the mean token's gradient reaches every token of its image, divided by N
    dpooled = tl.load(dpooled_ptr + tl.program_id(0) * C + cols, mask=col_ok, other=0.0).to(tl.float32)
    dout = tl.where(mask, tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + dpooled[None, :] / N,
                    0.0)
    dx = _normalise_backward(dout * weight[None, :], normed, rstd, C)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    # per-program partial sums over the tokens: d weight, d bias
    row = part_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * (2 * BLOCK_C)
    _store_affine_sums(row, cols, col_ok, dout, normed, BLOCK_C)


@triton.jit
def _residual_norm_fwd_kernel(x_ptr, branch_ptr, keep_ptr, weight_ptr, bias_ptr, total_ptr, out_ptr,
                              N, C, eps, HAS_KEEP: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, mask, cols, col_ok = _image_rows(N, C, ROWS, BLOCK_C)
    branch = tl.load(branch_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_KEEP:  # the image's stochastic-depth factor
        branch = branch * tl.load(keep_ptr + tl.program_id(0)).to(tl.float32)
    total = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + branch).to(total_ptr.dtype.element_ty)
    tl.store(total_ptr + offsets, total, mask=mask)
    # normalised as stored: the backward recomputes from the stored total
    normed, _ = _normalise(total.to(tl.float32), mask, C, eps)
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (normed * weight[None, :] + bias[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_norm_bwd_kernel(dtotal_ptr, dout_ptr, total_ptr, keep_ptr, weight_ptr, dx_ptr, dbranch_ptr,
                              part_ptr, N, C, eps, HAS_KEEP: tl.constexpr, ROWS: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    offsets, mask, cols, col_ok = _image_rows(N, C, ROWS, BLOCK_C)
    normed, rstd = _normalise(tl.load(total_ptr + offsets, mask=mask, other=0.0).to(tl.float32), mask, C, eps)
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dtotal = tl.load(dtotal_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dtotal += tl.where(mask, _normalise_backward(dout * weight[None, :], normed, rstd, C), 0.0)
    tl.store(dx_ptr + offsets, dtotal.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_KEEP:
        dtotal = dtotal * tl.load(keep_ptr + tl.program_id(0)).to(tl.float32)
    tl.store(dbranch_ptr + offsets, dtotal.to(dbranch_ptr.dtype.element_ty), mask=mask)

    # per-program partial sums over the tokens: d weight, d bias
    row = part_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * (2 * BLOCK_C)
    _store_affine_sums(row, cols, col_ok, dout, normed, BLOCK_C)


# ----------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------

def _launch_shape(N: int, C: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(C)
    rows = max(1, min(CONFIG["tile"] // block_c, triton.next_power_of_2(N)))
    return rows, block_c


def modulated_norm_fwd(mixed, grid, gate, skip_scale, weight, bias, eps: float, out_dtype) -> torch.Tensor:
    """``(B, N, C)`` contiguous ``mixed``, ``grid``; ``gate`` ``(B, C)``: ``y`` ``(B, N, C)``."""
    B, N, C = mixed.shape
    out = torch.empty((B, N, C), dtype=out_dtype, device=mixed.device)
    rows, block_c = _launch_shape(N, C)
    _modulated_norm_fwd_kernel[(B, triton.cdiv(N, rows))](
        mixed, grid, gate, skip_scale, weight, bias, out, N, C, eps,
        ROWS=rows, BLOCK_C=block_c, num_warps=CONFIG["warps"])
    return out


def modulated_norm_bwd(dout, mixed, grid, gate, skip_scale, weight, eps: float):
    """Gradients of :func:`modulated_norm_fwd`: ``dmixed``, ``dgrid`` (their inputs' dtypes)
    and the float32 sums ``dgate`` ``(B, C)``, ``dskip_scale`` ``(1,)``, ``dweight``, ``dbias``."""
    B, N, C = mixed.shape
    rows, block_c = _launch_shape(N, C)
    chunks = triton.cdiv(N, rows)
    dmixed = torch.empty_like(mixed)
    dgrid = torch.empty_like(grid)
    parts = torch.empty((B, chunks, 4 * block_c), dtype=torch.float32, device=mixed.device)
    _modulated_norm_bwd_kernel[(B, chunks)](
        dout, mixed, grid, gate, skip_scale, weight, dmixed, dgrid, parts, N, C, eps,
        ROWS=rows, BLOCK_C=block_c, num_warps=CONFIG["warps"])
    parts = parts.view(B, chunks, 4, block_c)  # the last row's block_c - 1 tail is unused
    dgate = parts[:, :, 0, :C].sum(1)
    return (dmixed, dgrid, dgate, parts[:, :, 3, :1].sum((0, 1)), parts[:, :, 1, :C].sum((0, 1)),
            parts[:, :, 2, :C].sum((0, 1)))


def gated_norm_fwd(ys, z, weight, bias, eps: float) -> torch.Tensor:
    """``ys`` contiguous ``(T, G, D)``, ``z`` ``(T, G * D)`` with unit channel stride,
    ``weight``/``bias`` ``(G, D)``: the output ``(T, G * D)`` in ``z``'s dtype."""
    tokens, groups, D = ys.shape
    out = torch.empty((tokens, groups * D), dtype=z.dtype, device=z.device)
    rows, block_d = _launch_shape(tokens, D)
    _gated_norm_fwd_kernel[(triton.cdiv(tokens, rows), groups)](
        ys, z, weight, bias, out, tokens, D, z.stride(0), eps,
        ROWS=rows, BLOCK_D=block_d, num_warps=CONFIG["warps"])
    return out


def gated_norm_bwd(dout, ys, z, weight, bias, eps: float):
    """Gradients of :func:`gated_norm_fwd`: ``dys`` ``(T, G, D)`` in ``ys``'s dtype, ``dz``
    ``(T, G * D)`` in ``z``'s dtype, and float32 ``dweight``, ``dbias`` ``(G, D)``."""
    tokens, groups, D = ys.shape
    rows, block_d = _launch_shape(tokens, D)
    chunks = triton.cdiv(tokens, rows)
    dys = torch.empty_like(ys)
    dz = torch.empty((tokens, groups * D), dtype=z.dtype, device=z.device)
    parts = torch.empty((chunks, groups, 2, block_d), dtype=torch.float32, device=z.device)
    _gated_norm_bwd_kernel[(chunks, groups)](
        dout, ys, z, weight, bias, dys, dz, parts, tokens, D, z.stride(0), eps,
        ROWS=rows, BLOCK_D=block_d, num_warps=CONFIG["warps"])
    return dys, dz, parts[:, :, 0, :D].sum(0), parts[:, :, 1, :D].sum(0)


def residual_norm_fwd(x, branch, keep, weight, bias, eps: float, out_dtype):
    """``x``, ``branch`` contiguous ``(B, N, C)``, ``keep`` ``(B,)`` or None: ``total``
    (``x + branch * keep`` in the dtype of their sum) and its LayerNorm in ``out_dtype``."""
    B, N, C = x.shape
    total = torch.empty((B, N, C), dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
    out = torch.empty((B, N, C), dtype=out_dtype, device=x.device)
    rows, block_c = _launch_shape(N, C)
    _residual_norm_fwd_kernel[(B, triton.cdiv(N, rows))](
        x, branch, x if keep is None else keep, weight, bias, total, out, N, C, eps,
        HAS_KEEP=keep is not None, ROWS=rows, BLOCK_C=block_c, num_warps=CONFIG["warps"])
    return total, out


def residual_norm_bwd(dtotal, dout, total, keep, weight, eps: float, x_dtype, branch_dtype):
    """Gradients of :func:`residual_norm_fwd` from those of its two outputs: ``dx``,
    ``dbranch`` (in ``x_dtype``, ``branch_dtype``) and float32 ``dweight``, ``dbias``."""
    B, N, C = total.shape
    rows, block_c = _launch_shape(N, C)
    chunks = triton.cdiv(N, rows)
    dx = torch.empty((B, N, C), dtype=x_dtype, device=total.device)
    dbranch = torch.empty((B, N, C), dtype=branch_dtype, device=total.device)
    parts = torch.empty((B, chunks, 2, block_c), dtype=torch.float32, device=total.device)
    _residual_norm_bwd_kernel[(B, chunks)](
        dtotal, dout, total, total if keep is None else keep, weight, dx, dbranch, parts, N, C, eps,
        HAS_KEEP=keep is not None, ROWS=rows, BLOCK_C=block_c, num_warps=CONFIG["warps"])
    return dx, dbranch, parts[:, :, 0, :C].sum((0, 1)), parts[:, :, 1, :C].sum((0, 1))


def pooled_norm_fwd(x, weight, bias, eps: float, out_dtype):
    """``x`` contiguous ``(B, N, C)``: its LayerNorm ``(B, N, C)`` in ``out_dtype`` and the
    mean token of that, ``(B, 1, C)`` in ``out_dtype``."""
    B, N, C = x.shape
    rows, block_c = _launch_shape(N, C)
    chunks = triton.cdiv(N, rows)
    out = torch.empty((B, N, C), dtype=out_dtype, device=x.device)
    parts = torch.empty((B, chunks, block_c), dtype=torch.float32, device=x.device)
    _pooled_norm_fwd_kernel[(B, chunks)](x, weight, bias, out, parts, N, C, eps,
                                         ROWS=rows, BLOCK_C=block_c, num_warps=CONFIG["warps"])
    return out, (parts[:, :, :C].sum(1, keepdim=True) / N).to(out_dtype)


def pooled_norm_bwd(dout, dpooled, x, weight, eps: float):
    """Gradients of :func:`pooled_norm_fwd` from those of its two outputs: ``dx`` (in
    ``x``'s dtype) and float32 ``dweight``, ``dbias``."""
    B, N, C = x.shape
    rows, block_c = _launch_shape(N, C)
    chunks = triton.cdiv(N, rows)
    dx = torch.empty_like(x)
    parts = torch.empty((B, chunks, 2, block_c), dtype=torch.float32, device=x.device)
    _pooled_norm_bwd_kernel[(B, chunks)](dout, dpooled, x, weight, dx, parts, N, C, eps,
                                         ROWS=rows, BLOCK_C=block_c, num_warps=CONFIG["warps"])
    return dx, parts[:, :, 0, :C].sum((0, 1)), parts[:, :, 1, :C].sum((0, 1))
