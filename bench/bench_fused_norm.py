"""The fused LayerNorm kernels (``kernels.fused_norm``) against the unfused ops, with bandwidth.

    python bench/bench_fused_norm.py                       # groupmamba_tiny's four stages, 224 px, batch 128
    python bench/bench_fused_norm.py --json bench/results/bench_fused_norm_h100.json

For each stage of groupmamba_tiny (tokens N, channels C; the gated norm's groups of
D = C / 4) and each op (the pooled, modulated, gated and residual norms), the forward and the
forward + backward are timed three ways:

- ``fused``: the Triton kernels (the backward recomputes the products);
- ``eager``: the model's unfused PyTorch ops under autocast, as an eager run does them;
- ``compiled``: the same unfused ops through ``torch.compile`` (what inductor fuses by
  itself in a compiled run).

Times are GPU times, medians in ms of ``triton.testing.do_bench_cudagraph``: the calls
are replayed from a CUDA graph, as a training step with ``--cuda-graph`` runs them
(without one, the small stages would time Python's launch overhead). ``TB/s`` is the
traffic floor (one read of each full-size input, one write of each full-size output, in
the dtypes the model uses: bf16 activations, float32 LayerNorm input and scan output)
over the time, to compare with the GPU's memory bandwidth (~3.35 TB/s on an H100 SXM,
~4.8 on an H200).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import fused_norm
from utils.images import atomic_write_json

# groupmamba_tiny at 224 px: tokens and channels per stage
STAGES = {"stage1": (3136, 64), "stage2": (784, 128), "stage3": (196, 348), "stage4": (49, 448)}
GROUPS = 4
# bytes per element of the traffic floor: forward, forward + backward
MODULATED_BYTES = (2 + 4 + 2, (2 + 4 + 2) + (2 + 2 + 4 + 2 + 4))  # mixed bf16, grid f32, out bf16
GATED_BYTES = (4 + 2 + 2, (4 + 2 + 2) + (2 + 4 + 2 + 4 + 2))  # ys f32, z bf16, out bf16
POOLED_BYTES = (4 + 4, (4 + 4) + (4 + 4 + 4))  # x f32, out f32 (the mean token is small)
RESIDUAL_BYTES = (4 + 2 + 4 + 2, (4 + 2 + 4 + 2) + (4 + 2 + 4 + 4 + 2))  # x f32, branch bf16, total f32, out bf16


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=sorted(STAGES))
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    return parser.parse_args(argv)


def modulated_unfused(mixed, skip_scale, grid, gate, weight, bias):
    # GroupMambaLayer's tail under bf16 autocast: float32 products and norm, cast for proj
    return F.layer_norm(mixed * skip_scale * grid * gate, weight.shape, weight, bias).to(torch.bfloat16)


def modulated_fused(mixed, skip_scale, grid, gate, weight, bias):
    return fused_norm.modulated_layer_norm(mixed, skip_scale, grid, gate, weight, bias, 1e-5, torch.bfloat16)


def gated_unfused(ys, z, weight, bias):
    # grouped_ss2d's tail: per-group norm and affine in float32, cast, times SiLU(z) in bf16
    normed = torch.addcmul(bias, F.layer_norm(ys, ys.shape[-1:]), weight)
    return normed.to(z.dtype).reshape(z.shape) * F.silu(z)


def gated_fused(ys, z, weight, bias):
    return fused_norm.gated_group_norm(ys, z, weight, bias, 1e-5)


def pooled_unfused(x, weight, bias):
    # GroupMambaLayer's first norm (float32 under autocast) and the mean token of its gate
    out = F.layer_norm(x, weight.shape, weight, bias)
    return out, out.mean(dim=1, keepdim=True)


def pooled_fused(x, weight, bias):
    return fused_norm.pooled_layer_norm(x, weight, bias, 1e-5, torch.float32)


def residual_unfused(x, branch, keep, weight, bias):
    # GroupMambaBlock: stochastic depth on the bf16 branch, the float32 residual sum, norm2
    total = x + branch * keep.view(-1, 1, 1).to(branch.dtype)
    return total, F.layer_norm(total, weight.shape, weight, bias).to(torch.bfloat16)


def residual_fused(x, branch, keep, weight, bias):
    return fused_norm.residual_layer_norm(x, branch, keep, weight, bias, 1e-5, torch.bfloat16)


def modulated_inputs(batch, tokens, channels):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
    return [rand(batch, tokens, channels).to(torch.bfloat16), torch.ones(1, device="cuda"),
            rand(batch, tokens, channels), torch.rand(batch, 1, channels, device="cuda").to(torch.bfloat16),
            1.0 + 0.1 * rand(channels), 0.1 * rand(channels)]


def gated_inputs(batch, tokens, channels):
    gen = torch.Generator(device="cuda").manual_seed(0)
    width = channels // GROUPS
    projection = torch.randn(batch, tokens, 2 * channels, device="cuda", generator=gen).to(torch.bfloat16)
    return [torch.randn(batch, tokens, GROUPS, width, device="cuda", generator=gen), projection[..., channels:],
            1.0 + 0.1 * torch.randn(GROUPS, width, device="cuda", generator=gen),
            0.1 * torch.randn(GROUPS, width, device="cuda", generator=gen)]


def pooled_inputs(batch, tokens, channels):
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(batch, tokens, channels, device="cuda", generator=gen),
            1.0 + 0.1 * torch.randn(channels, device="cuda", generator=gen),
            0.1 * torch.randn(channels, device="cuda", generator=gen)]


def residual_inputs(batch, tokens, channels):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
    keep = (torch.rand(batch, device="cuda", generator=gen) > 0.1) / 0.9
    return [rand(batch, tokens, channels), rand(batch, tokens, channels).to(torch.bfloat16), keep,
            1.0 + 0.1 * rand(channels), 0.1 * rand(channels)]


def time_ms(fn, inputs, backward: bool, constants=()) -> float:
    """Median ms of ``fn(*inputs)`` (and its backward to every input not in ``constants``)."""
    from triton.testing import do_bench_cudagraph  # noqa: PLC0415 - GPU only
    leaves = [t.detach().requires_grad_(backward and index not in constants) for index, t in enumerate(inputs)]
    with torch.no_grad():  # a graph kept alive here would tie the leaves' gradients to this stream
        outs = fn(*leaves)
    douts = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]

    def run():
        result = fn(*leaves)
        if backward:
            torch.autograd.grad(result, [t for t in leaves if t.requires_grad], douts)
    return do_bench_cudagraph(run, rep=100, return_mode="median")


def bench_op(name, unfused, fused, make_inputs, bytes_per_element, constants, batch, tokens,
             channels) -> list[dict]:
    """The rows of one op at one shape; ``constants``: the inputs that take no gradient."""
    inputs = make_inputs(batch, tokens, channels)
    elements = batch * tokens * channels
    torch._dynamo.reset()  # a fresh compile for each shape: past the recompile limit dynamo runs eager code
    compiled = torch.compile(unfused)
    rows = []
    for backward, bytes_each in zip((False, True), bytes_per_element):
        for way, fn in (("fused", fused), ("eager", unfused), ("compiled", compiled)):
            ms = time_ms(fn, inputs, backward, constants)
            rows.append({"op": name, "pass": "forward+backward" if backward else "forward", "way": way,
                         "batch": batch, "tokens": tokens, "channels": channels, "ms": round(ms, 4),
                         "tb_s": round(elements * bytes_each / ms / 1e9, 3)})
    return rows


# (name, unfused, fused, inputs, bytes per element, inputs that take no gradient: the
# residual norm's stochastic-depth factors)
OPS = (("pooled", pooled_unfused, pooled_fused, pooled_inputs, POOLED_BYTES, ()),
       ("modulated", modulated_unfused, modulated_fused, modulated_inputs, MODULATED_BYTES, ()),
       ("gated", gated_unfused, gated_fused, gated_inputs, GATED_BYTES, ()),
       ("residual", residual_unfused, residual_fused, residual_inputs, RESIDUAL_BYTES, (2,)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (torch.cuda.is_available() and fused_norm.HAS_TRITON):
        raise SystemExit("bench_fused_norm.py needs a CUDA GPU and Triton")
    rows = []
    for stage in args.stages:
        tokens, channels = STAGES[stage]
        for op in OPS:
            for row in bench_op(*op, args.batch, tokens, channels):
                rows.append({"stage": stage, **row})
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        atomic_write_json(args.json, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                      "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
