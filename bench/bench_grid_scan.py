"""The channels-last grid scan (``kernels.grid_scan``) against the sequence path, per launch config.

    python bench/bench_grid_scan.py                  # groupmamba_tiny's four stages, batch 128
    python bench/bench_grid_scan.py --json results/bench_grid_scan_h200.json
    python bench/bench_grid_scan.py --shipped-only

For each stage shape (bf16 ``u``, ``delta``; ``B``, ``C`` strided views of the
x_proj output, as in the model): forward and backward of

- ``sequence``: each group gathered into its scan order, the scan backend's
  kernels (``--backend``, default the CUDA extension), ``y`` gathered back, in
  eager PyTorch; ``scan only`` rows time the scan backend's op alone on inputs
  already in sequence layout (the floor of that path: no gathers at all);
- ``fused``: the Triton kernels reading the maps in place, under each launch
  configuration of ``triton_grid_scan.CONFIG`` swept here; ``best_config`` is the
  one with the least time over the shapes, weighted by how many of
  groupmamba_tiny's blocks run each.

Times are ``triton.testing.do_bench`` medians in ms.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench_dwconv import best_config, launch_configs, median_ms, write_result

# (batch, H = W, channels a group, dt_rank) of groupmamba_tiny's GroupMambaLayers
SHAPES = {"stage1": (128, 56, 16, 1), "stage2": (128, 28, 32, 2), "stage3": (128, 14, 87, 6),
          "stage4": (128, 7, 112, 7)}
SHAPE_WEIGHTS = {"stage1": 3, "stage2": 4, "stage3": 9, "stage4": 3}
# no 256-step forward or 128-step backward chunks, and 4 warps only: a wider sweep on an
# H200 never picked those chunks, and 2 warps only for the smallest forward shape
FWD_SWEEP = {"fwd_block_t": (32, 64, 128), "fwd_block_c": (8, 16, 32), "fwd_warps": (4,)}
BWD_SWEEP = {"bwd_block_t": (16, 32, 64), "bwd_block_c": (8, 16, 32), "bwd_warps": (4,)}
DIRECTIONS = ("row", "col", "row_reversed", "col_reversed")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--backend", default="cuda", help="scan backend of the sequence path")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--shipped-only", action="store_true",
                        help="time only the shipped launch configuration, no sweep")
    return parser.parse_args(argv)


def make_inputs(shape) -> dict:
    batch, size, per_group, dt_rank = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    groups, length = len(DIRECTIONS), size * size
    dim = groups * per_group

    def rand(*dims, scale=1.0):
        return (scale * torch.randn(*dims, device="cuda", generator=gen)).to(torch.bfloat16)

    x_proj = rand(batch, length, groups * (dt_rank + 2))  # (dt, B, C) sections, as _grouped_linear cuts them
    return dict(u=rand(batch, length, dim), delta=rand(batch, length, dim, scale=0.5),
                A=-(0.5 + torch.rand(dim, 1, device="cuda", generator=gen)),
                B=x_proj[..., groups * dt_rank:groups * (dt_rank + 1)], C=x_proj[..., groups * (dt_rank + 1):],
                D=torch.randn(dim, device="cuda", generator=gen),
                delta_bias=0.3 * torch.randn(dim, device="cuda", generator=gen),
                directions=DIRECTIONS, height=size, width=size)


def forward_backward_times(fn, inputs: dict, do_bench, forward: bool = True, backward: bool = True) -> dict:
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if torch.is_tensor(v)}
    args = {**inputs, **leaves}
    times = {}
    if forward:
        with torch.no_grad():
            times["fwd_ms"] = do_bench(lambda: fn(**args))
    if backward:
        y = fn(**args)
        dy = torch.randn_like(y)
        times["bwd_ms"] = do_bench(lambda: torch.autograd.grad(y, list(leaves.values()), dy, retain_graph=True))
    return times


def scan_only_times(inputs: dict, backend: str, do_bench) -> dict:
    """The scan backend alone on the same data already laid out as sequences."""
    from kernels.selective_scan import selective_scan_fn
    u = inputs["u"]
    batch, length, dim = u.shape
    groups = len(DIRECTIONS)

    def sequences(t, per):  # (batch, L, G * per) -> contiguous (batch, G * per, L)
        return t.transpose(1, 2).contiguous().view(batch, groups * per, length)

    seq = dict(u=sequences(u, dim // groups), delta=sequences(inputs["delta"], dim // groups),
               A=inputs["A"], B=sequences(inputs["B"], 1).unsqueeze(2), C=sequences(inputs["C"], 1).unsqueeze(2),
               D=inputs["D"], delta_bias=inputs["delta_bias"])
    return forward_backward_times(
        lambda **a: selective_scan_fn(**a, delta_softplus=True, backend=backend), seq, do_bench)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_grid_scan.py needs a CUDA GPU")
    from kernels import grid_scan
    from kernels.grid_scan import triton_grid_scan as kernels

    default = dict(kernels.CONFIG)
    rows = []
    for name in args.shapes:
        inputs = make_inputs(SHAPES[name])
        for impl, times in (
                ("sequence", forward_backward_times(
                    lambda **a: grid_scan.reference(**a, backend=args.backend), inputs, median_ms)),
                ("scan only", scan_only_times(inputs, args.backend, median_ms))):
            rows.append({"shape": name, "dims": SHAPES[name], "impl": impl, "backend": args.backend, **times})
            print(rows[-1], flush=True)
        for config, forward, backward in launch_configs(args.shipped_only, FWD_SWEEP, BWD_SWEEP):
            kernels.CONFIG.update(default, **config)
            times = forward_backward_times(grid_scan.fused_scan, inputs, median_ms, forward, backward)
            rows.append({"shape": name, "dims": SHAPES[name], "impl": "fused", "config": dict(kernels.CONFIG),
                         **times})
            print(rows[-1], flush=True)
        kernels.CONFIG.update(default)
    best = None if args.shipped_only else {**best_config(rows, FWD_SWEEP, ("fwd_ms",), SHAPE_WEIGHTS),
                                            **best_config(rows, BWD_SWEEP, ("bwd_ms",), SHAPE_WEIGHTS)}
    write_result(rows, best, args.json)
    return rows


if __name__ == "__main__":
    main()
