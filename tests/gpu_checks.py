"""Helpers of the GPU tests that compare a fused path with the unfused one (not a test module)."""
import torch


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def grads_under_bf16_autocast(module, x: torch.Tensor, compiled: bool = False, height: int = 14,
                              width: int = 14):
    """``(output, dx, {parameter: gradient})`` of ``module(x, height, width)`` under bf16
    autocast, the loss the mean square of the output; compiled with ``fullgraph=True``."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    run = torch.compile(module, fullgraph=True) if compiled else module
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run(x, height, width)
    out.float().square().mean().backward()
    return out.float(), x.grad, {name: p.grad.clone() for name, p in module.named_parameters()}


def set_fused_kernels(module, on: bool) -> None:
    """Switch the fused-kernel path of ``module`` and every submodule that has one."""
    for submodule in module.modules():
        if hasattr(submodule, "fused_kernels"):
            submodule.fused_kernels = on


def fused_and_unfused_in_float32(module, x: torch.Tensor, *args, seed=None):
    """``[(output, dx, {parameter: gradient})]`` of ``module(x, *args)`` with the fused
    path, then without, in float32 (TF32 off), the loss the mean square of the output;
    ``seed`` reseeds before each forward (the same samples dropped by stochastic depth)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    results = []
    for fused in (True, False):
        set_fused_kernels(module, fused)
        module.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        if seed is not None:
            torch.manual_seed(seed)
        out = module(xx, *args)
        out.square().mean().backward()
        results.append((out, xx.grad, {name: p.grad.clone() for name, p in module.named_parameters()}))
    return results


# A LayerNorm right after a scale leaves the scale almost no gradient (the norm undoes
# any scale but for its eps): what is left is mostly rounding noise, which a fused
# kernel sums in another order, so it is compared on the scale of the other gradients.
SCALE_INVARIANT = ("skip_scale",)
# Likewise a gradient that is zero but for rounding, such as the scans' decay rates
# (A_logs) for one-token images, which have no earlier state to decay
NOISE_LEVEL = 1e-6


def assert_grads_close(fused: dict, unfused: dict, rtol: float) -> None:
    """Each gradient within ``rtol`` (relative); a scale-invariant parameter's, or one
    below ``NOISE_LEVEL`` of the largest, within ``rtol`` of the largest gradient's norm."""
    largest = max(g.float().norm().item() for g in unfused.values())
    for name, expected in unfused.items():
        noise = expected.float().norm().item() < NOISE_LEVEL * largest
        if noise or name.rsplit(".", 1)[-1] in SCALE_INVARIANT:
            assert (fused[name].float() - expected.float()).norm().item() <= rtol * largest, name
        else:
            assert relative_error(fused[name], expected) < rtol, name


def assert_fused_matches_unfused_in_float32(module, x: torch.Tensor, *args, dx_rtol: float, seed=None) -> float:
    """:func:`fused_and_unfused_in_float32`, checked: the output within 1e-5 (relative),
    dx within ``dx_rtol``, the parameter gradients by :func:`assert_grads_close` within
    1e-4; returns the larger of the output's and dx's errors."""
    (out_f, dx_f, g_f), (out_u, dx_u, g_u) = fused_and_unfused_in_float32(module, x, *args, seed=seed)
    out_error, dx_error = relative_error(out_f, out_u), relative_error(dx_f, dx_u)
    assert out_error < 1e-5 and dx_error < dx_rtol, (out_error, dx_error)
    assert_grads_close(g_f, g_u, 1e-4)
    return max(out_error, dx_error)
