"""Triton kernels: 3x3 depth-wise conv (stride 1, zero padding 1) + bias + activation,
channels-last, with the backward split so that nothing but the conv's input is saved.

Importing this module without Triton, or without a CUDA device, raises
``ImportError`` with the reason. ``TRITON_INTERPRET=1`` lifts the CUDA
requirement so the kernels can be checked on CPU tensors (slow; small shapes).

Layout: ``x`` is ``(B, H, W, C)`` with unit channel stride (other strides free,
e.g. one half of a wider projection); outputs are contiguous ``(B, H, W, C)``.
A program owns a block of columns (up to ``BLOCK_W``) times a block of channels
and walks down the image's rows, loading each input row once as three column
shifts (``-1, 0, +1``; the shifted loads overlap and hit L1): a row finishes one
output row, adds to the next and starts the one after, so two partial output
rows are carried in registers. Row indices and validity are scalars, and
everything accumulates in float32.

- forward: ``y = act(conv(x) + b)``, ``rows_per_program`` output rows a program;
- backward, first kernel: the same walk recomputes the pre-activation from ``x``;
  ``g = dy * act'(pre)`` (and ``act(pre)`` again, when a following linear layer
  needs its input for the weight gradient);
- backward, second kernel: a program walks down all rows of one image: ``dx =
  conv(g)`` with the kernel mirrored, while ``dw[c, tap] = sum_p g[p, c] x[p + tap,
  c]`` (each ``g`` row against the ``x`` rows above, at and below it, the row
  above kept from the previous step) and ``db = sum_p g`` accumulate
  elementwise in registers; they are reduced over the columns once at the end,
  and the per-program partial sums added up on the host (deterministic, no
  atomics).
"""
import torch

from kernels import load_triton

triton, tl = load_triton("the fused depth-wise conv")

__all__ = ["ACTIVATIONS", "dwconv_act_fwd", "dwconv_act_bwd_pre", "dwconv_bwd_input_weight"]

ACTIVATIONS = {"none": 0, "gelu": 1, "silu": 2}

# launch configuration (module-level so that bench/bench_dwconv.py can sweep it):
# tiles are [block_w, block_c], block_w at most W rounded up to a power of two; a
# conv-rows program walks rows_per_program output rows; the reduction kernel
# carries sixteen float32 tiles down the rows, so its tiles are smaller; its warps
# None = 8 for tiles of >= 2048, else 4. The values are the best of a launch-setting
# sweep on an H200 (bench_dwconv.py), weighted over GroupMamba-tiny's three
# feed-forward shapes; at 128 x 56 x 56 x 512: 0.65 / 0.90 / 0.82 ms for forward /
# backward parts 1 and 2, against 0.88 / 0.93 / 1.31 ms for the one-row kernels
# these replaced and 1.15 / 1.53 ms (forward / backward) for cuDNN with a GELU
CONFIG = {"row_block_w": 8, "row_block_c": 64, "row_warps": 4, "rows_per_program": 16,
          "reduction_block_w": 4, "reduction_block_c": 64, "reduction_warps": 4}


# ----------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------

@triton.jit
def _activation(pre, ACT: tl.constexpr):
    if ACT == 1:  # exact (erf) GELU, as nn.GELU()
        return 0.5 * pre * (1.0 + tl.erf(pre * 0.7071067811865476))
    elif ACT == 2:  # SiLU
        return pre / (1.0 + tl.exp(-pre))
    else:
        return pre


@triton.jit
def _activation_grad(pre, ACT: tl.constexpr):
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
        pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327
        return cdf + pre * pdf
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-pre))
        return sig * (1.0 + pre * (1.0 - sig))
    else:
        return tl.full(pre.shape, 1.0, tl.float32)


@triton.jit
def _row_segment(ptr, image_base, row, cols, DX: tl.constexpr, offs_c, cmask, H, W, s_h, s_w):
    """``t[b, row, cols + DX, c]`` as float32, zero outside the image (``image_base`` = b's offset)."""
    q = cols + DX
    ok = (q >= 0) & (q < W) & (row >= 0) & (row < H)
    base = image_base + row * s_h  # within one image: fits in int32
    return tl.load(ptr + base + (q * s_w)[:, None] + offs_c[None, :], mask=ok[:, None] & cmask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _shifted_row(ptr, image_base, row, cols, offs_c, cmask, H, W, s_h, s_w):
    """Row ``row`` at columns ``cols - 1``, ``cols`` and ``cols + 1``: three float32 tiles."""
    return (_row_segment(ptr, image_base, row, cols, -1, offs_c, cmask, H, W, s_h, s_w),
            _row_segment(ptr, image_base, row, cols, 0, offs_c, cmask, H, W, s_h, s_w),
            _row_segment(ptr, image_base, row, cols, 1, offs_c, cmask, H, W, s_h, s_w))


@triton.jit
def _kernel_row(w_ptr, offs_c, cmask, KY: tl.constexpr):
    """The three weights of kernel row ``KY`` per channel, float32."""
    base = w_ptr + offs_c * 9 + KY * 3
    return (tl.load(base, mask=cmask, other=0.0).to(tl.float32),
            tl.load(base + 1, mask=cmask, other=0.0).to(tl.float32),
            tl.load(base + 2, mask=cmask, other=0.0).to(tl.float32))


@triton.jit
def _tile(W, C, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's columns and channels (grid axes 1 and 2), the channel mask and the tile's mask."""
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    return cols, offs_c, cmask, (cols < W)[:, None] & cmask[None, :]


@triton.jit
def _taps(left, mid, right, w_left, w_mid, w_right):
    """One kernel row applied to one image row's three column shifts."""
    return left * w_left[None, :] + mid * w_mid[None, :] + right * w_right[None, :]


@triton.jit
def _conv_rows_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, out_ptr, h_ptr, H, W, C, s_b, s_h, s_w,
                      HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BACKWARD: tl.constexpr,
                      STORE_H: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """``ROWS`` output rows of one image for a block of columns and channels.

    Walks down the input rows, loading each once (three column shifts): input row
    ``i`` completes output row ``i - 1`` (kernel row 2), adds kernel row 1 to
    output row ``i`` and starts output row ``i + 1`` with kernel row 0, so only
    two partial output rows are carried. The epilogue is the forward's
    ``act(pre)``, or with ``BACKWARD`` the first backward kernel's
    ``g = dy * act'(pre)`` (and ``act(pre)`` with ``STORE_H``).
    """
    chunks = tl.cdiv(H, ROWS)
    image = (tl.program_id(0) // chunks).to(tl.int64)
    first = (tl.program_id(0) % chunks) * ROWS
    cols, offs_c, cmask, tile_mask = _tile(W, C, BLOCK_W, BLOCK_C)
    x_base = image * s_b
    out_base = image * H * W * C
    top_l, top_m, top_r = _kernel_row(w_ptr, offs_c, cmask, 0)
    mid_l, mid_m, mid_r = _kernel_row(w_ptr, offs_c, cmask, 1)
    bot_l, bot_m, bot_r = _kernel_row(w_ptr, offs_c, cmask, 2)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    left, mid, right = _shifted_row(x_ptr, x_base, first - 1, cols, offs_c, cmask, H, W, s_h, s_w)
    upper = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)  # output row i - 1 (kernel rows 0, 1 so far)
    lower = _taps(left, mid, right, top_l, top_m, top_r)    # output row i (kernel row 0 so far)
    for i in range(first, first + ROWS + 1):
        left, mid, right = _shifted_row(x_ptr, x_base, i, cols, offs_c, cmask, H, W, s_h, s_w)
        pre = upper + _taps(left, mid, right, bot_l, bot_m, bot_r) + bias[None, :]
        upper = lower + _taps(left, mid, right, mid_l, mid_m, mid_r)
        lower = _taps(left, mid, right, top_l, top_m, top_r)
        row = i - 1
        mask = tile_mask & (row >= first) & (row < H)
        dst = out_base + row * W * C + (cols * C)[:, None] + offs_c[None, :]
        if BACKWARD:
            dy = tl.load(dy_ptr + dst, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + dst, (dy * _activation_grad(pre, ACT)).to(out_ptr.dtype.element_ty), mask=mask)
            if STORE_H:
                tl.store(h_ptr + dst, _activation(pre, ACT).to(h_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + dst, _activation(pre, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_input_weight_kernel(x_ptr, w_ptr, g_ptr, dx_ptr, dw_part_ptr, db_part_ptr, H, W, C, s_b, s_h, s_w,
                             BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dx``, and per-program partial ``dw``/``db``, walking down all rows of one image.

    ``y[p] = sum_t w[t] x[p + t]``, so ``dx[p] = sum_t w[t] g[p - t]`` (the conv
    of ``g`` with the kernel mirrored: ``g``'s column shifts in reverse order, its
    row ``i`` completing ``dx`` row ``i - 1``) and ``dw[t] = sum_p g[p] x[p + t]``
    (row ``i`` of ``g`` pairs with ``x`` rows ``i - 1`` and ``i``, row ``i - 1`` of
    ``g`` with ``x`` row ``i``). Each row of ``g`` and ``x`` is loaded once.
    """
    # grid (B, W blocks, C blocks); g and dx are contiguous (B, H, W, C)
    image = tl.program_id(0).to(tl.int64)
    cols, offs_c, cmask, tile_mask = _tile(W, C, BLOCK_W, BLOCK_C)
    x_base = image * s_b
    g_base = image * H * W * C
    top_l, top_m, top_r = _kernel_row(w_ptr, offs_c, cmask, 0)
    mid_l, mid_m, mid_r = _kernel_row(w_ptr, offs_c, cmask, 1)
    bot_l, bot_m, bot_r = _kernel_row(w_ptr, offs_c, cmask, 2)
    zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    # dw by kernel row (top, mid, bot) and column (left, centre, right)
    dw_tl, dw_tm, dw_tr, dw_ml, dw_mm, dw_mr, dw_bl, dw_bm, dw_br = zero, zero, zero, zero, zero, zero, zero, zero, zero
    db = zero
    upper, lower = zero, zero  # dx rows i - 1 and i, partial
    x_up_l, x_up_m, x_up_r, g_up = zero, zero, zero, zero  # x and g of the row above
    for i in range(0, H + 1):
        g_l, g_m, g_r = _shifted_row(g_ptr, g_base, i, cols, offs_c, cmask, H, W, W * C, C)
        x_l, x_m, x_r = _shifted_row(x_ptr, x_base, i, cols, offs_c, cmask, H, W, s_h, s_w)
        # mirrored kernel: the left weight meets g one column to the right
        done = upper + _taps(g_r, g_m, g_l, top_l, top_m, top_r)
        upper = lower + _taps(g_r, g_m, g_l, mid_l, mid_m, mid_r)
        lower = _taps(g_r, g_m, g_l, bot_l, bot_m, bot_r)
        dst = g_base + (i - 1) * W * C + (cols * C)[:, None] + offs_c[None, :]
        tl.store(dx_ptr + dst, done.to(dx_ptr.dtype.element_ty), mask=tile_mask & (i >= 1))
        dw_tl += g_m * x_up_l
        dw_tm += g_m * x_up_m
        dw_tr += g_m * x_up_r
        dw_ml += g_m * x_l
        dw_mm += g_m * x_m
        dw_mr += g_m * x_r
        dw_bl += g_up * x_l
        dw_bm += g_up * x_m
        dw_br += g_up * x_r
        db += g_m
        x_up_l, x_up_m, x_up_r, g_up = x_l, x_m, x_r, g_m
    # one partial row per (image, column block)
    part = (image * tl.num_programs(1) + tl.program_id(1)) * C
    tl.store(db_part_ptr + part + offs_c, tl.sum(db, axis=0), mask=cmask)
    dw_part = dw_part_ptr + part * 9 + offs_c
    tl.store(dw_part + 0 * C, tl.sum(dw_tl, axis=0), mask=cmask)
    tl.store(dw_part + 1 * C, tl.sum(dw_tm, axis=0), mask=cmask)
    tl.store(dw_part + 2 * C, tl.sum(dw_tr, axis=0), mask=cmask)
    tl.store(dw_part + 3 * C, tl.sum(dw_ml, axis=0), mask=cmask)
    tl.store(dw_part + 4 * C, tl.sum(dw_mm, axis=0), mask=cmask)
    tl.store(dw_part + 5 * C, tl.sum(dw_mr, axis=0), mask=cmask)
    tl.store(dw_part + 6 * C, tl.sum(dw_bl, axis=0), mask=cmask)
    tl.store(dw_part + 7 * C, tl.sum(dw_bm, axis=0), mask=cmask)
    tl.store(dw_part + 8 * C, tl.sum(dw_br, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------

def _check(x: torch.Tensor) -> None:
    # the kernels' own precondition; the op (kernels.depthwise_conv) checks the arguments
    if x.stride(3) != 1:
        raise ValueError(f"x must have a unit channel stride, got strides {x.stride()}")


def _block_w(width: int, key: str) -> int:
    return min(CONFIG[key], triton.next_power_of_2(width))


def _row_launch(batch: int, height: int, width: int, channels: int):
    """Grid and meta-parameters of the conv-rows kernel."""
    block_w, block_c, rows = _block_w(width, "row_block_w"), CONFIG["row_block_c"], CONFIG["rows_per_program"]
    grid = (batch * triton.cdiv(height, rows), triton.cdiv(width, block_w), triton.cdiv(channels, block_c))
    return grid, {"ROWS": rows, "BLOCK_W": block_w, "BLOCK_C": block_c, "num_warps": CONFIG["row_warps"]}


def dwconv_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias, act: str) -> torch.Tensor:
    """``act(conv3x3_depthwise(x) + bias)`` for channels-last ``x`` ``(B, H, W, C)``."""
    _check(x)
    batch, height, width, channels = x.shape
    y = torch.empty((batch, height, width, channels), dtype=x.dtype, device=x.device)
    if y.numel():
        grid, meta = _row_launch(batch, height, width, channels)
        _conv_rows_kernel[grid](
            x, weight.contiguous(), bias if bias is not None else weight, y, y, y,
            height, width, channels, x.stride(0), x.stride(1), x.stride(2),
            HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], BACKWARD=False, STORE_H=False, **meta)
    return y


def dwconv_act_bwd_pre(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias, act: str,
                       recompute_output: bool):
    """``(g, y)``: ``g = dy * act'(pre)``, and ``y = act(pre)`` when ``recompute_output``."""
    _check(x)
    batch, height, width, channels = x.shape
    dy = dy.contiguous()
    g = torch.empty((batch, height, width, channels), dtype=x.dtype, device=x.device)
    y = torch.empty_like(g) if recompute_output else None
    if g.numel():
        grid, meta = _row_launch(batch, height, width, channels)
        _conv_rows_kernel[grid](
            x, weight.contiguous(), bias if bias is not None else weight, dy, g,
            y if y is not None else g, height, width, channels,
            x.stride(0), x.stride(1), x.stride(2), HAS_BIAS=bias is not None,
            ACT=ACTIVATIONS[act], BACKWARD=True, STORE_H=recompute_output, **meta)
    return g, y


def dwconv_bwd_input_weight(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """``(dx, dweight, dbias)`` of the conv, given ``g``, the gradient of its output.

    ``dweight`` and ``dbias`` are float32 (partial sums added in float32).
    """
    _check(x)
    batch, height, width, channels = x.shape
    g = g.contiguous()
    dx = torch.empty((batch, height, width, channels), dtype=x.dtype, device=x.device)
    if not dx.numel():
        return (dx, torch.zeros((channels, 1, 3, 3), dtype=torch.float32, device=x.device),
                torch.zeros(channels, dtype=torch.float32, device=x.device))
    block_w, block_c = _block_w(width, "reduction_block_w"), CONFIG["reduction_block_c"]
    warps = CONFIG["reduction_warps"] or (8 if block_w * block_c >= 2048 else 4)
    grid = (batch, triton.cdiv(width, block_w), triton.cdiv(channels, block_c))
    parts = batch * grid[1]
    dw_part = torch.empty((parts, 9, channels), dtype=torch.float32, device=x.device)
    db_part = torch.empty((parts, channels), dtype=torch.float32, device=x.device)
    _bwd_input_weight_kernel[grid](
        x, weight.contiguous(), g, dx, dw_part, db_part, height, width, channels,
        x.stride(0), x.stride(1), x.stride(2), BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)
    dweight = dw_part.sum(0).t().contiguous().view(channels, 1, 3, 3)
    return dx, dweight, db_part.sum(0)
