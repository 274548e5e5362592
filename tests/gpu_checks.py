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
