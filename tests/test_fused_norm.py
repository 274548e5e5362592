"""The fused LayerNorm ops of ``kernels.fused_norm``: the mixer's pooled and modulated
norms, the grouped SS2D pipeline's gated group norm and the block's residual norm.

On the CPU: the PyTorch references against the model's own computations, argument
errors, and the Triton kernels under Triton's CPU interpreter (forward, every gradient,
several programs per image, one-token images, channel counts that are not powers of
two, bfloat16 inputs, a strided gate, stochastic depth, ``opcheck`` of all eight custom
ops). On a GPU (skipped without CUDA): a GroupMambaLayer and a GroupMambaBlock with and
without the fused ops, float32 and bf16 autocast, eager and compiled.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import fused_norm
from models.groupmamba import GroupMambaBlock, GroupMambaLayer
from models.csms6s import SCAN_DIRECTIONS
from models.ss2d import SS2D
from gpu_checks import (assert_fused_matches_unfused_in_float32, assert_grads_close, grads_under_bf16_autocast,
                        relative_error)
from subprocesses import run_in_triton_interpreter


def _inputs(batch=2, tokens=12, channels=8, dtype=torch.float64):
    torch.manual_seed(0)
    return dict(mixed=torch.randn(batch, tokens, channels, dtype=dtype), skip_scale=torch.tensor([0.8], dtype=dtype),
                grid=torch.randn(batch, tokens, channels, dtype=dtype),
                gate=torch.rand(batch, 1, channels, dtype=dtype), weight=torch.randn(channels, dtype=dtype),
                bias=torch.randn(channels, dtype=dtype))


def test_reference_is_the_products_then_layer_norm():
    args = _inputs()
    product = args["mixed"] * args["skip_scale"] * args["grid"] * args["gate"]
    expected = F.layer_norm(product, (8,), args["weight"], args["bias"], 1e-6)
    torch.testing.assert_close(fused_norm.modulated_layer_norm_reference(**args, eps=1e-6), expected,
                               rtol=1e-12, atol=1e-12)
    assert fused_norm.modulated_layer_norm_reference(**args, out_dtype=torch.float32).dtype == torch.float32


def test_reference_is_what_the_mixer_computes_before_proj():
    torch.manual_seed(0)
    layer = GroupMambaLayer(16, 16, scan_backend="torch").double()
    with torch.no_grad():
        layer.skip_scale.fill_(0.7)
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    tokens = torch.randn(2, 3 * 5, 16, dtype=torch.float64)
    normed = layer.norm(tokens)
    mixed = layer.scan_groups(normed.view(2, 3, 5, 16)).reshape(2, 15, 16)
    gate = layer.channel_affinity(normed.mean(dim=1, keepdim=True))
    fused = fused_norm.modulated_layer_norm_reference(mixed, layer.skip_scale, normed, gate, layer.norm.weight,
                                                      layer.norm.bias, layer.norm.eps)
    torch.testing.assert_close(layer.proj(fused), layer(tokens, 3, 5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change, message", [
    ({"grid": torch.randn(2, 12, 4)}, "mixed and grid"),
    ({"gate": torch.rand(2, 8)}, "gate must be"),
    ({"skip_scale": torch.ones(2)}, "skip_scale must hold one value"),
    ({"weight": torch.ones(4)}, "weight must be"),
    ({"bias": None}, "bias must be"),
])
def test_bad_arguments_raise_value_error(change, message):
    args = _inputs(dtype=torch.float32)
    args.update(change)
    for fn in (fused_norm.modulated_layer_norm_reference, fused_norm.modulated_layer_norm):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_gated_reference_is_each_ss2d_output_norm_times_its_silu_gate():
    torch.manual_seed(0)
    scans = [SS2D(6, direction=d).double() for d in SCAN_DIRECTIONS]
    for scan in scans:
        with torch.no_grad():
            scan.out_norm.weight.normal_()
            scan.out_norm.bias.normal_()
    ys = torch.randn(2, 3, 5, 4, 6, dtype=torch.float64)
    z = torch.randn(2, 3, 5, 24, dtype=torch.float64)
    expected = torch.cat([scan.out_norm(ys[..., g, :]) * F.silu(z[..., 6 * g:6 * (g + 1)])
                          for g, scan in enumerate(scans)], -1)
    weight = torch.stack([scan.out_norm.weight for scan in scans])
    bias = torch.stack([scan.out_norm.bias for scan in scans])
    got = fused_norm.gated_group_norm_reference(ys, z, weight, bias, scans[0].out_norm.eps)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change, message", [
    ({"z": torch.randn(2, 3, 20)}, "z must be"),
    ({"z": torch.randn(2, 5, 24)}, "z must be"),
    ({"weight": torch.ones(4, 5)}, "weight must be"),
    ({"ys": torch.randn(6)}, "ys must be"),
])
def test_gated_bad_arguments_raise_value_error(change, message):
    args = {"ys": torch.randn(2, 3, 4, 6), "z": torch.randn(2, 3, 24), "weight": torch.ones(4, 6),
            "bias": torch.zeros(4, 6)}
    args.update(change)
    for fn in (fused_norm.gated_group_norm_reference, fused_norm.gated_group_norm):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_pooled_reference_is_the_mixer_s_norm_and_mean_token():
    torch.manual_seed(0)
    layer = GroupMambaLayer(16, 16).double()
    with torch.no_grad():
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    out, pooled = fused_norm.pooled_layer_norm_reference(x, layer.norm.weight, layer.norm.bias, layer.norm.eps)
    torch.testing.assert_close(out, layer.norm(x), rtol=0, atol=0)
    torch.testing.assert_close(pooled, layer.norm(x).mean(dim=1, keepdim=True), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x must be"):
        fused_norm.pooled_layer_norm(x[0], layer.norm.weight, layer.norm.bias)
    with pytest.raises(ValueError, match="bias must be"):
        fused_norm.pooled_layer_norm_reference(x, layer.norm.weight, layer.norm.bias[:4])


def test_residual_reference_is_the_block_s_residual_sum_and_norm2():
    torch.manual_seed(0)
    block = GroupMambaBlock(32, 2, drop_path=0.5).double().train()
    with torch.no_grad():
        block.norm2.weight.normal_()
        block.norm2.bias.normal_()
    x, branch = torch.randn(6, 10, 32, dtype=torch.float64), torch.randn(6, 10, 32, dtype=torch.float64)
    torch.manual_seed(1)
    expected_total = x + block.drop_path(branch)
    torch.manual_seed(1)
    keep = block.drop_path.keep_factors(branch)
    assert keep is not None and set(keep.tolist()) <= {0.0, 2.0}
    total, out = fused_norm.residual_layer_norm_reference(x, branch, keep, block.norm2.weight, block.norm2.bias,
                                                          block.norm2.eps)
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    torch.testing.assert_close(out, block.norm2(expected_total), rtol=0, atol=0)
    assert block.eval().drop_path.keep_factors(branch) is None


def test_residual_bad_arguments_raise_value_error():
    x = torch.randn(2, 3, 4)
    for fn in (fused_norm.residual_layer_norm_reference, fused_norm.residual_layer_norm):
        with pytest.raises(ValueError, match="keep must be"):
            fn(x, x, torch.ones(3), torch.ones(4), torch.zeros(4))
        with pytest.raises(ValueError, match="x and branch"):
            fn(x, x[:, :2], None, torch.ones(4), torch.zeros(4))


_INTERPRETER_CHECK = r"""
import torch
from kernels import fused_norm
from kernels.fused_norm import triton_norm

triton_norm.CONFIG.update(tile=64)  # several programs per image
torch.manual_seed(0)
worst = 0.0


def both(reference, fused, inputs, call=lambda fn, leaves: fn(*leaves)):
    # each op's outputs and its inputs' gradients, the same random output gradients for both
    results, seed = [], torch.randint(1 << 30, ()).item()
    for fn in (reference, fused):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outs = call(fn, leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.manual_seed(seed)
        torch.autograd.backward(outs, [torch.randn(o.shape).to(o.dtype) for o in outs])
        results.append([o.detach() for o in outs] + [t.grad for t in leaves])
    return results


def compare(case, results, low_precision=False, loose=()):
    # low precision: a bf16 tensor, one rounding apart; ``loose``: indices checked to 1e-3
    global worst
    for index, (got, ref) in enumerate(zip(*reversed(results))):
        assert got.shape == ref.shape and got.dtype == ref.dtype, (case, index, got.shape, ref.shape)
        error = ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6)).item()
        limit = 1e-2 if low_precision else 1e-3 if index in loose else 1e-5
        assert error < limit, (case, index, error)
        worst = max(worst, error if limit == 1e-5 else 0.0)


# modulated norm: (B, N, C, mixed dtype, eps): C not a power of two, one-token images, a
# bf16 input as the model's; a large eps makes skip_scale's gradient (index 2) more than
# rounding noise (the LayerNorm undoes any scale but for eps)
for B, N, C, dtype, eps in [(2, 37, 24, torch.float32, 0.5), (3, 1, 20, torch.float32, 0.5),
                            (2, 50, 12, torch.float32, 1e-5), (1, 130, 6, torch.bfloat16, 0.5)]:
    inputs = [torch.randn(B, N, C).to(dtype), torch.tensor([0.7]), torch.randn(B, N, C), torch.rand(B, 1, C),
              torch.randn(C), torch.randn(C)]
    results = both(fused_norm.modulated_layer_norm_reference, fused_norm.modulated_layer_norm, inputs,
                   lambda fn, leaves: fn(*leaves, eps=eps, out_dtype=torch.float32))
    compare(("modulated", B, N, C), results, dtype == torch.bfloat16, loose=(2,) if eps < 1e-3 else ())
args = [torch.randn(2, 5, 6), torch.tensor([0.9]), torch.randn(2, 5, 6), torch.rand(2, 1, 6), torch.randn(6),
        torch.randn(6)]
torch.library.opcheck(torch.ops.groupmamba_norm.modulated_layer_norm.default,
                      [t.clone().requires_grad_() for t in args] + [1e-5, torch.float32])
torch.library.opcheck(torch.ops.groupmamba_norm.modulated_layer_norm_backward.default,
                      [torch.randn(2, 5, 6)] + args[:5] + [1e-5])

# gated group norm: (tokens, G, D, z dtype, strided z), D not a power of two (the released
# stage 3 has 87), several programs, z the second half of a wider tensor
for T, G, D, dtype, strided in [(37, 4, 7, torch.float32, True), (5, 2, 16, torch.float32, False),
                                 (70, 4, 3, torch.bfloat16, True)]:
    inputs = [torch.randn(T, G, D), torch.randn(T, 2 * G * D).to(dtype), torch.randn(G, D), torch.randn(G, D)]
    half = (lambda wide: wide[:, G * D:]) if strided else (lambda wide: wide[:, :G * D].contiguous())
    results = both(fused_norm.gated_group_norm_reference, fused_norm.gated_group_norm, inputs,
                   lambda fn, leaves: fn(leaves[0], half(leaves[1]), leaves[2], leaves[3], 1e-5))
    compare(("gated", T, G, D), results, dtype == torch.bfloat16)
ys, z, weight, bias = torch.randn(6, 2, 5), torch.randn(6, 20)[:, 10:], torch.randn(2, 5), torch.randn(2, 5)
torch.library.opcheck(torch.ops.groupmamba_norm.gated_group_norm.default,
                      (ys.requires_grad_(), z, weight.requires_grad_(), bias, 1e-5))
torch.library.opcheck(torch.ops.groupmamba_norm.gated_group_norm_backward.default,
                      (torch.randn(6, 10), ys.detach(), z, weight.detach(), bias, 1e-5))

# pooled norm: (B, N, C, x dtype), both outputs in the loss
for B, N, C, dtype in [(2, 37, 24, torch.float32), (3, 1, 20, torch.float32), (2, 13, 6, torch.bfloat16)]:
    inputs = [torch.randn(B, N, C).to(dtype), torch.randn(C), torch.randn(C)]
    results = both(fused_norm.pooled_layer_norm_reference, fused_norm.pooled_layer_norm, inputs,
                   lambda fn, leaves: fn(*leaves, 1e-5, torch.float32))
    compare(("pooled", B, N, C), results, dtype == torch.bfloat16)
x, weight, bias = torch.randn(2, 5, 6), torch.randn(6), torch.randn(6)
leaf = x.clone().requires_grad_()
fused_norm.pooled_layer_norm(leaf, weight, bias)[1].sum().backward()  # the norm's output unused
assert leaf.grad is not None
torch.library.opcheck(torch.ops.groupmamba_norm.pooled_layer_norm.default,
                      (x.clone().requires_grad_(), weight.clone().requires_grad_(), bias, 1e-5, torch.float32))
torch.library.opcheck(torch.ops.groupmamba_norm.pooled_layer_norm_backward.default,
                      (torch.randn(2, 5, 6), torch.randn(2, 1, 6), x, weight, 1e-5))

# residual norm: (B, N, C, branch dtype, stochastic depth), both outputs in the loss
for B, N, C, dtype, drop in [(2, 37, 24, torch.float32, True), (3, 1, 20, torch.float32, False),
                             (2, 13, 6, torch.bfloat16, True)]:
    keep = torch.tensor([0.0, 2.0, 2.0])[:B] if drop else None
    inputs = [torch.randn(B, N, C), torch.randn(B, N, C).to(dtype), torch.randn(C), torch.randn(C)]
    results = both(fused_norm.residual_layer_norm_reference, fused_norm.residual_layer_norm, inputs,
                   lambda fn, leaves: fn(leaves[0], leaves[1], keep, leaves[2], leaves[3], 1e-6))
    # a bf16 branch: the reference scales it in bf16, as the model's stochastic depth
    compare(("residual", B, N, C), results, dtype == torch.bfloat16)
x, branch, weight, bias = torch.randn(2, 5, 6), torch.randn(2, 5, 6), torch.randn(6), torch.randn(6)
leaf = x.clone().requires_grad_()
fused_norm.residual_layer_norm(leaf, branch, None, weight, bias)[1].sum().backward()  # the sum unused
assert leaf.grad is not None
for keep in (None, torch.tensor([0.0, 2.0])):
    torch.library.opcheck(torch.ops.groupmamba_norm.residual_layer_norm.default,
                          (x.clone().requires_grad_(), branch.clone().requires_grad_(), keep,
                           weight.clone().requires_grad_(), bias, 1e-5, torch.float32))
    torch.library.opcheck(torch.ops.groupmamba_norm.residual_layer_norm_backward.default,
                          (torch.randn(2, 5, 6), torch.randn(2, 5, 6), x, keep, weight, 1e-5,
                           torch.float32, torch.float32))
print("WORST", worst)
"""


@pytest.mark.skipif(not fused_norm.HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_in_interpreter():
    run_in_triton_interpreter(_INTERPRETER_CHECK)


_BLOCK_IN_INTERPRETER = r"""
import torch
from kernels.fused_norm import triton_norm
from models.groupmamba import GroupMambaBlock
from gpu_checks import assert_fused_matches_unfused_in_float32

triton_norm.CONFIG.update(tile=256)  # several programs per image
torch.manual_seed(0)
block = GroupMambaBlock(32, 2, drop_path=0.5, scan_backend="torch").train()
with torch.no_grad():
    for module in block.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.normal_(1.0, 0.2)
            module.bias.normal_(0.0, 0.2)
    block.attn.skip_scale.fill_(0.8)
worst = assert_fused_matches_unfused_in_float32(block, torch.randn(3, 5 * 6, 32), 5, 6, dx_rtol=1e-5, seed=1)
print("WORST", worst)
"""


@pytest.mark.skipif(not fused_norm.HAS_TRITON, reason="triton is not installed")
def test_low_memory_block_matches_the_unfused_block_in_interpreter():
    """The whole low-memory block (both fused depth-wise convs and the four fused norms,
    stochastic depth on) against the unfused block, every kernel in Triton's interpreter."""
    run_in_triton_interpreter(_BLOCK_IN_INTERPRETER)


# --------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fused_norm.HAS_TRITON),
                                reason="needs a CUDA GPU and Triton")


def _layer(channels: int) -> GroupMambaLayer:
    torch.manual_seed(0)
    layer = GroupMambaLayer(channels, channels, scan_backend="auto").cuda()
    with torch.no_grad():
        layer.skip_scale.fill_(0.9)
        layer.norm.weight.normal_(1.0, 0.1)
        layer.norm.bias.normal_(0.0, 0.1)
    return layer


@needs_cuda
@pytest.mark.parametrize("height, width", [(14, 14), (1, 1)])
def test_fused_layer_matches_unfused_in_float32(height, width):
    layer = _layer(64)
    x = torch.randn(3, height * width, 64, device="cuda")
    assert_fused_matches_unfused_in_float32(layer, x, height, width, dx_rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_layer_matches_unfused_under_bf16_autocast(compiled):
    layer = _layer(128)
    x = torch.randn(4, 14 * 14, 128, device="cuda")
    layer.fused_kernels = True
    out_f, dx_f, g_f = grads_under_bf16_autocast(layer, x, compiled)
    layer.fused_kernels = False
    out_u, dx_u, g_u = grads_under_bf16_autocast(layer, x)
    assert out_f.dtype == out_u.dtype
    assert relative_error(out_f, out_u) < 1e-2 and relative_error(dx_f, dx_u) < 2e-2
    assert_grads_close(g_f, g_u, 3e-2)


@needs_cuda
def test_fused_block_with_stochastic_depth_matches_unfused_in_float32():
    torch.manual_seed(0)
    block = GroupMambaBlock(64, 4, drop_path=0.5).cuda().train()
    x = torch.randn(6, 14 * 14, 64, device="cuda")
    assert_fused_matches_unfused_in_float32(block, x, 14, 14, dx_rtol=1e-4, seed=1)  # the same samples dropped
