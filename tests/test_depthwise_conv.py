"""The fused depth-wise conv + activation (+ linear) op of ``kernels.depthwise_conv``.

On the CPU: the PyTorch reference equals the model's unfused layers, argument
errors, and the Triton kernels under Triton's CPU interpreter (forward, every
gradient, strided input, several programs per reduction, ``opcheck`` of the custom
op's registration). On a GPU (skipped without CUDA): the model's blocks with and
without the fused op, eager and compiled.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels import depthwise_conv
from models.groupmamba import ConvMlp, GroupMambaBlock
from gpu_checks import (assert_fused_matches_unfused_in_float32, assert_grads_close, grads_under_bf16_autocast,
                        relative_error, set_fused_kernels)
from subprocesses import run_in_triton_interpreter

def test_reference_equals_the_unfused_feed_forward():
    torch.manual_seed(0)
    mlp = ConvMlp(8, 24).double()
    tokens = torch.randn(2, 5 * 7, 8, dtype=torch.float64)
    hidden = mlp.fc1(tokens)
    fused = depthwise_conv.reference(hidden.view(2, 5, 7, 24), mlp.dwconv.dwconv.weight, mlp.dwconv.dwconv.bias,
                                     "gelu", mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(fused.view(2, 35, 8), mlp(tokens, 5, 7), rtol=1e-12, atol=1e-12)


def test_reference_without_linear_is_conv_then_activation():
    x = torch.randn(1, 4, 6, 3, dtype=torch.float64)
    weight, bias = torch.randn(3, 1, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = F.silu(F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=1, groups=3)).permute(0, 2, 3, 1)
    torch.testing.assert_close(depthwise_conv.reference(x, weight, bias, "silu"), expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"act": "relu6"}, "act must be one of"),
    ({"x": torch.randn(2, 3, 4)}, "channels-last"),
    ({"conv_weight": torch.randn(4, 1, 5, 5)}, "3x3 depth-wise"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    args = {"x": torch.randn(1, 3, 3, 4), "conv_weight": torch.randn(4, 1, 3, 3), "conv_bias": None, "act": "gelu"}
    args.update(kwargs)
    for fn in (depthwise_conv.reference, depthwise_conv.conv3x3_act_linear):
        with pytest.raises(ValueError, match=message):
            fn(**args)


_INTERPRETER_CHECK = r"""
import torch
from kernels import depthwise_conv
from kernels.depthwise_conv import triton_dwconv

triton_dwconv.CONFIG.update(row_block_w=4, reduction_block_w=4, rows_per_program=2)  # several column blocks and row chunks
torch.manual_seed(0)

def run(fn, x, params, bias, act, linear, strided, dy=None):
    x = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in params]
    it = iter(params)
    conv_w = next(it)
    conv_b = next(it) if bias else None
    lin_w = next(it) if linear else None
    lin_b = next(it) if linear and bias else None
    # a strided channels-last view: the first half of a twice-as-wide tensor
    inp = torch.cat([x, torch.zeros_like(x)], -1)[..., :x.shape[-1]] if strided else x
    y = fn(inp, conv_w, conv_b, act, lin_w, lin_b)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in params], dy

# (B, H, W, C, linear out, act, bias, strided): C not a multiple of the channel block,
# 1x1 and single-row images, masks on every border
cases = [(2, 5, 7, 70, 12, "gelu", True, False), (1, 9, 4, 3, 0, "silu", True, True),
         (3, 3, 3, 65, 5, "none", False, False), (1, 1, 1, 8, 4, "gelu", True, False),
         (2, 11, 13, 130, 0, "gelu", False, True), (2, 1, 17, 6, 3, "silu", True, False)]
worst = 0.0
for B, H, W, C, O, act, bias, strided in cases:
    x = torch.randn(B, H, W, C)
    params = [0.3 * torch.randn(C, 1, 3, 3)] + ([torch.randn(C)] if bias else [])
    if O:
        params += [0.2 * torch.randn(O, C)] + ([torch.randn(O)] if bias else [])
    ref, dy = run(depthwise_conv.reference, x, params, bias, act, bool(O), strided)
    got, _ = run(depthwise_conv.conv3x3_act_linear, x, params, bias, act, bool(O), strided, dy)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item())

x = torch.randn(2, 4, 5, 6)
w, b = torch.randn(6, 1, 3, 3), torch.randn(6)
lw, lb = torch.randn(3, 6), torch.randn(3)
torch.library.opcheck(torch.ops.groupmamba_dwconv.conv3x3_act_linear.default,
                      (x.requires_grad_(), w.requires_grad_(), b, "gelu", lw.requires_grad_(), lb))
# the backward op's fake kernel promises gradients in their parameters' layouts: the real
# one must deliver them, also for a channels-last conv weight (the model stores them so)
for weight in (w, w.to(memory_format=torch.channels_last)):
    torch.library.opcheck(torch.ops.groupmamba_dwconv.conv3x3_act_linear_backward.default,
                          (torch.randn(2, 4, 5, 3), x.detach(), weight.detach(), b, "silu", lw.detach(), lb))
    weight = weight.detach().clone().requires_grad_()
    depthwise_conv.conv3x3_act_linear(x.detach(), weight, b, "gelu", lw, lb).sum().backward()
    assert weight.grad.stride() == weight.stride(), (weight.grad.stride(), weight.stride())
print("WORST", worst)
assert worst < 1e-5, worst
"""


def _has_triton():
    return depthwise_conv.HAS_TRITON


@pytest.mark.skipif(not _has_triton(), reason="triton is not installed")
@pytest.mark.slow
def test_triton_kernels_in_interpreter():
    run_in_triton_interpreter(_INTERPRETER_CHECK)


# --------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _has_triton()),
                                reason="needs a CUDA GPU and Triton")


def _block_grads(block, x, fused: bool, compiled: bool = False):
    set_fused_kernels(block, fused)
    return grads_under_bf16_autocast(block, x, compiled)


@needs_cuda
def test_fused_block_matches_unfused_in_float32():
    torch.manual_seed(0)
    block = GroupMambaBlock(64, 4, scan_backend="torch").cuda()
    x = torch.randn(2, 14 * 14, 64, device="cuda")
    assert_fused_matches_unfused_in_float32(block, x, 14, 14, dx_rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_block_matches_unfused_under_bf16_autocast(compiled):
    torch.manual_seed(0)
    block = GroupMambaBlock(128, 8, scan_backend="triton").cuda()
    x = torch.randn(4, 14 * 14, 128, device="cuda")
    out_f, dx_f, g_f = _block_grads(block, x, fused=True, compiled=compiled)
    out_u, dx_u, g_u = _block_grads(block, x, fused=False)
    # bf16 rounding of the unfused conv output (the fused kernel keeps it in float32)
    assert relative_error(out_f, out_u) < 1e-2 and relative_error(dx_f, dx_u) < 2e-2
    assert_grads_close(g_f, g_u, 3e-2)


def test_low_memory_leaves_cpu_results_unchanged():
    """The fused op runs on CUDA only: on the CPU fused_kernels changes nothing."""
    from models import create_model
    images = torch.randn(1, 3, 64, 64)
    outputs = []
    for fused_kernels in (False, True):
        torch.manual_seed(0)
        model = create_model("groupmamba_tiny", num_classes=3, fused_kernels=fused_kernels).eval()
        assert all(m.fused_kernels == fused_kernels for m in model.modules() if hasattr(m, "fused_kernels"))
        with torch.no_grad():
            outputs.append(model(images))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
