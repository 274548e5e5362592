"""Triton kernels: 3x3 depth-wise conv (stride 1, zero padding 1) + bias + activation,
channels-last, with the backward split so that nothing but the conv's input is saved.

Importing this module without Triton, or without a CUDA device, raises
``ImportError`` with the reason. ``TRITON_INTERPRET=1`` lifts the CUDA
requirement so the kernels can be checked on CPU tensors (slow; small shapes).

Layout: ``x`` is ``(B, H, W, C)`` with unit channel stride (other strides free,
e.g. one half of a wider projection); outputs are contiguous ``(B, H, W, C)``.
A program owns one image row (up to ``BLOCK_W`` positions of it) times a block of
channels: the row index and the row's validity are scalars, each tap is one
masked load of a whole neighbouring row segment (served by L1/L2 after the first),
and everything accumulates in float32.

- forward: ``y = act(conv(x) + b)``;
- backward, first kernel: the pre-activation is recomputed from ``x``;
  ``g = dy * act'(pre)`` (and ``act(pre)`` again, when a following linear layer
  needs its input for the weight gradient);
- backward, second kernel: a program walks down the rows of one image for a
  block of columns and channels: ``dx = conv(g)`` with the kernel mirrored, row by
  row, while ``dw[c, tap] = sum_p g[p, c] x[p + tap, c]`` and ``db = sum_p g``
  accumulate elementwise in registers; they are reduced over the row once at the
  end, and the per-program partial sums added up on the host (deterministic, no
  atomics).
"""
import os

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"the fused depth-wise conv needs the 'triton' package ({exc})") from exc

if not _INTERPRET and not torch.cuda.is_available():
    raise ImportError("the fused depth-wise conv needs a CUDA GPU (torch.cuda.is_available() is False)")

__all__ = ["ACTIVATIONS", "dwconv_act_fwd", "dwconv_act_bwd_pre", "dwconv_bwd_input_weight"]

ACTIVATIONS = {"none": 0, "gelu": 1, "silu": 2}

# launch configuration (module-level so that bench/bench_dwconv.py can sweep it):
# row kernels take [block_w, row_block_c] tiles, block_w = min(max_block_w, W rounded
# up to a power of two); the reduction kernel holds ten float32 accumulator tiles,
# so its channel blocks are narrower; warps None = 8 for tiles of >= 2048, else 4.
# The best of bench_dwconv.py's sweep on an H200 at GroupMamba-tiny's largest shape
# (128 x 56 x 56 x 512): 0.88 / 0.93 / 1.31 ms for the three kernels, against
# 1.02 / 1.35 / 1.58 ms with 64-wide rows and 64-channel row blocks
CONFIG = {"max_block_w": 16, "row_block_c": 128, "row_warps": 4, "reduction_block_c": 32,
          "reduction_warps": None}


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
def _conv_row(x_ptr, w_ptr, b_ptr, image_base, row, cols, offs_c, cmask, H, W, s_h, s_w,
              HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The conv's pre-activation (bias included) on one row segment: ``[BLOCK_W, BLOCK_C]`` float32."""
    acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for ky in tl.static_range(3):
        for kx in tl.static_range(3):
            xv = _row_segment(x_ptr, image_base, row + (ky - 1), cols, kx - 1, offs_c, cmask, H, W, s_h, s_w)
            wv = tl.load(w_ptr + offs_c * 9 + (ky * 3 + kx), mask=cmask, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _row_program(H, W, C, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (image, row, columns, channels) for a grid ``(B * H, W blocks, C blocks)``."""
    image_row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    return image_row // H, image_row % H, cols, offs_c, cols < W, offs_c < C


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, H, W, C, s_b, s_h, s_w,
                HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    image, row, cols, offs_c, wmask, cmask = _row_program(H, W, C, BLOCK_W, BLOCK_C)
    pre = _conv_row(x_ptr, w_ptr, b_ptr, image.to(tl.int64) * s_b, row, cols, offs_c, cmask, H, W, s_h, s_w,
                    HAS_BIAS, BLOCK_W, BLOCK_C)
    dst = tl.program_id(0).to(tl.int64) * W * C + (cols * C)[:, None] + offs_c[None, :]
    tl.store(y_ptr + dst, _activation(pre, ACT).to(y_ptr.dtype.element_ty),
             mask=wmask[:, None] & cmask[None, :])


@triton.jit
def _bwd_pre_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, g_ptr, h_ptr, H, W, C, s_b, s_h, s_w,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_H: tl.constexpr,
                    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    image, row, cols, offs_c, wmask, cmask = _row_program(H, W, C, BLOCK_W, BLOCK_C)
    pre = _conv_row(x_ptr, w_ptr, b_ptr, image.to(tl.int64) * s_b, row, cols, offs_c, cmask, H, W, s_h, s_w,
                    HAS_BIAS, BLOCK_W, BLOCK_C)
    dst = tl.program_id(0).to(tl.int64) * W * C + (cols * C)[:, None] + offs_c[None, :]
    mask = wmask[:, None] & cmask[None, :]
    dy = tl.load(dy_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_ptr + dst, (dy * _activation_grad(pre, ACT)).to(g_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + dst, _activation(pre, ACT).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tap_grads(x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c, cmask, H, W, C,
               s_h, s_w, KY: tl.constexpr, KX: tl.constexpr):
    """One tap's share of ``dx`` on this row, and its elementwise ``dw`` products.

    ``y[p] = sum_t w[t] x[p + t]``, so ``dx[p] = sum_t w[t] g[p - t]`` and
    ``dw[t] = sum_p g[p] x[p + t]``.
    """
    wv = tl.load(w_ptr + offs_c * 9 + (KY * 3 + KX), mask=cmask, other=0.0).to(tl.float32)
    g_back = _row_segment(g_ptr, g_base, row + (1 - KY), cols, 1 - KX, offs_c, cmask, H, W, W * C, C)
    x_fwd = _row_segment(x_ptr, x_base, row + (KY - 1), cols, KX - 1, offs_c, cmask, H, W, s_h, s_w)
    return g_back * wv[None, :], g_center * x_fwd


@triton.jit
def _tap_step(dx, dw_tap, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c, cmask, H, W, C,
              s_h, s_w, KY: tl.constexpr, KX: tl.constexpr):
    d, p = _tap_grads(x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c, cmask, H, W, C,
                      s_h, s_w, KY, KX)
    return dx + d, dw_tap + p


@triton.jit
def _bwd_input_weight_kernel(x_ptr, w_ptr, g_ptr, dx_ptr, dw_part_ptr, db_part_ptr, H, W, C, s_b, s_h, s_w,
                             BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (B, W blocks, C blocks); g and dx are contiguous (B, H, W, C)
    image = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wmask = cols < W
    cmask = offs_c < C
    mask = wmask[:, None] & cmask[None, :]
    x_base = image * s_b
    g_base = image * H * W * C
    zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    dw0, dw1, dw2, dw3, dw4, dw5, dw6, dw7, dw8, db = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    for row in range(H):
        g_center = _row_segment(g_ptr, g_base, row, cols, 0, offs_c, cmask, H, W, W * C, C)
        db += g_center
        # the nine taps unrolled by hand: Triton carries no list of accumulators through a loop
        dx = zero
        dx, dw0 = _tap_step(dx, dw0, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c,
                              cmask, H, W, C, s_h, s_w, 0, 0)
        dx, dw1 = _tap_step(dx, dw1, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c,
                              cmask, H, W, C, s_h, s_w, 0, 1)
        dx, dw2 = _tap_step(dx, dw2, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c,
                              cmask, H, W, C, s_h, s_w, 0, 2)
        dx, dw3 = _tap_step(dx, dw3, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c,
                              cmask, H, W, C, s_h, s_w, 1, 0)
        dx, dw4 = _tap_step(dx, dw4, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c,
                              cmask, H, W, C, s_h, s_w, 1, 1)
        dx, dw5 = _tap_step(dx, dw5, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c,
                              cmask, H, W, C, s_h, s_w, 1, 2)
        dx, dw6 = _tap_step(dx, dw6, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c,
                              cmask, H, W, C, s_h, s_w, 2, 0)
        dx, dw7 = _tap_step(dx, dw7, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c,
                              cmask, H, W, C, s_h, s_w, 2, 1)
        dx, dw8 = _tap_step(dx, dw8, x_ptr, g_ptr, w_ptr, x_base, g_base, row, cols, g_center, offs_c,
                              cmask, H, W, C, s_h, s_w, 2, 2)
        dst = g_base + row * W * C + (cols * C)[:, None] + offs_c[None, :]
        tl.store(dx_ptr + dst, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    # one partial row per (image, column block)
    part = (image * tl.num_programs(1) + tl.program_id(1)) * C
    tl.store(db_part_ptr + part + offs_c, tl.sum(db, axis=0), mask=cmask)
    dw_part = dw_part_ptr + part * 9 + offs_c
    tl.store(dw_part + 0 * C, tl.sum(dw0, axis=0), mask=cmask)
    tl.store(dw_part + 1 * C, tl.sum(dw1, axis=0), mask=cmask)
    tl.store(dw_part + 2 * C, tl.sum(dw2, axis=0), mask=cmask)
    tl.store(dw_part + 3 * C, tl.sum(dw3, axis=0), mask=cmask)
    tl.store(dw_part + 4 * C, tl.sum(dw4, axis=0), mask=cmask)
    tl.store(dw_part + 5 * C, tl.sum(dw5, axis=0), mask=cmask)
    tl.store(dw_part + 6 * C, tl.sum(dw6, axis=0), mask=cmask)
    tl.store(dw_part + 7 * C, tl.sum(dw7, axis=0), mask=cmask)
    tl.store(dw_part + 8 * C, tl.sum(dw8, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------

def _check(x: torch.Tensor) -> None:
    # the kernels' own precondition; the op (kernels.depthwise_conv) checks the arguments
    if x.stride(3) != 1:
        raise ValueError(f"x must have a unit channel stride, got strides {x.stride()}")


def _block_w(width: int) -> int:
    return min(CONFIG["max_block_w"], triton.next_power_of_2(width))


def _row_launch(batch: int, height: int, width: int, channels: int):
    """Grid and meta-parameters of the row kernels."""
    block_c = CONFIG["row_block_c"]
    grid = (batch * height, triton.cdiv(width, _block_w(width)), triton.cdiv(channels, block_c))
    return grid, {"BLOCK_W": _block_w(width), "BLOCK_C": block_c, "num_warps": CONFIG["row_warps"]}


def dwconv_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias, act: str) -> torch.Tensor:
    """``act(conv3x3_depthwise(x) + bias)`` for channels-last ``x`` ``(B, H, W, C)``."""
    _check(x)
    batch, height, width, channels = x.shape
    y = torch.empty((batch, height, width, channels), dtype=x.dtype, device=x.device)
    if y.numel():
        grid, meta = _row_launch(batch, height, width, channels)
        _fwd_kernel[grid](
            x, weight.contiguous(), bias if bias is not None else weight, y,
            height, width, channels, x.stride(0), x.stride(1), x.stride(2),
            HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], **meta)
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
        _bwd_pre_kernel[grid](
            x, weight.contiguous(), bias if bias is not None else weight, dy, g,
            y if y is not None else g, height, width, channels,
            x.stride(0), x.stride(1), x.stride(2), HAS_BIAS=bias is not None,
            ACT=ACTIVATIONS[act], STORE_H=recompute_output, **meta)
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
    block_w, block_c = _block_w(width), CONFIG["reduction_block_c"]
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
