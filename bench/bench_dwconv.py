"""The fused depth-wise conv kernels (``kernels.depthwise_conv``) against cuDNN, per launch config.

    python bench/bench_dwconv.py                  # GroupMamba-tiny's feed-forward shapes, batch 128
    python bench/bench_dwconv.py --json results/bench_dwconv_h200.json
    python bench/bench_dwconv.py --shipped-only --shapes stage1 stage2 stage3

For each shape ``(B, H, W, C)`` (bf16, channels-last, GELU): the forward
(``conv + bias + GELU``) and the backward (``dx, dw, db`` from ``dy``), once as
cuDNN's depth-wise conv with PyTorch's GELU (autograd keeps the conv's output),
and once as the fused kernels (the backward recomputes the conv) under each
launch configuration of ``triton_dwconv.CONFIG`` swept here (the conv-rows kernel's
keys and the reduction kernel's separately; ``best_config`` is the combination
with the least time over the shapes, weighted by how many of groupmamba_tiny's
blocks run each). Times are
``triton.testing.do_bench`` medians in ms; ``GB/s`` counts one read of each input
and one write of each output (the traffic floor), so it can be compared to the
GPU's memory bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.images import atomic_write_json

SHAPES = {"stage1": (128, 56, 56, 512), "stage2": (128, 28, 28, 1024), "stage3": (128, 14, 14, 1392)}
ROW_SWEEP = {"row_block_w": (8, 16), "row_block_c": (32, 64), "row_warps": (2, 4),
             "rows_per_program": (8, 16, 32)}
REDUCTION_SWEEP = {"reduction_block_w": (4, 8), "reduction_block_c": (16, 32, 64), "reduction_warps": (2, 4)}
# how often groupmamba_tiny runs each shape's ConvMlp conv: 3, 4 and 6 blocks a stage
SHAPE_WEIGHTS = {"stage1": 3, "stage2": 4, "stage3": 6}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--shipped-only", action="store_true",
                        help="time only the shipped launch configuration, no sweep")
    return parser.parse_args(argv)


def _inputs(shape):
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, height, width, channels = shape
    x = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)
    weight = 0.3 * torch.randn(channels, 1, 3, 3, device="cuda", generator=gen)
    bias = torch.randn(channels, device="cuda", generator=gen)
    dy = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)
    return x, weight, bias, dy


def cudnn_times(shape, do_bench) -> dict:
    x, weight, bias, dy = _inputs(shape)
    x_map = x.permute(0, 3, 1, 2).requires_grad_()  # a channels-last NCHW view, as in the model
    w16, b16 = weight.bfloat16().requires_grad_(), bias.bfloat16().requires_grad_()

    def forward():
        return F.gelu(F.conv2d(x_map, w16, b16, padding=1, groups=shape[3]))

    out = forward()
    dy_map = dy.permute(0, 3, 1, 2)
    backward = lambda: torch.autograd.grad(out, (x_map, w16, b16), dy_map, retain_graph=True)  # noqa: E731
    with torch.no_grad():
        fwd_ms = do_bench(forward)
    return {"fwd_ms": fwd_ms, "bwd_ms": do_bench(backward)}


def fused_times(shape, kernels, do_bench, row: bool = True, reduction: bool = True) -> dict:
    """Times of the conv-rows kernel (forward, backward part 1) and/or the reduction kernel."""
    x, weight, bias, dy = _inputs(shape)
    times = {}
    if row:
        times["fwd_ms"] = do_bench(lambda: kernels.dwconv_act_fwd(x, weight, bias, "gelu"))
        times["bwd_pre_ms"] = do_bench(lambda: kernels.dwconv_act_bwd_pre(dy, x, weight, bias, "gelu", False))
    if reduction:
        g, _ = kernels.dwconv_act_bwd_pre(dy, x, weight, bias, "gelu", recompute_output=False)
        times["bwd_input_weight_ms"] = do_bench(lambda: kernels.dwconv_bwd_input_weight(g, x, weight))
    return times


def best_config(rows: list[dict], sweep_spec: dict, time_keys: tuple[str, ...],
                weights: dict | None = None) -> dict:
    """The swept values with the least ``time_keys`` time over the shapes, weighted by
    how often groupmamba_tiny runs each shape (``weights``, default ``SHAPE_WEIGHTS``)."""
    weights = SHAPE_WEIGHTS if weights is None else weights
    totals: dict[tuple, float] = {}
    shapes: dict[tuple, set] = {}
    for row in rows:
        if row["impl"] == "fused" and all(k in row for k in time_keys):
            key = tuple(row["config"][k] for k in sweep_spec)
            totals[key] = totals.get(key, 0.0) + weights[row["shape"]] * sum(row[k] for k in time_keys)
            shapes.setdefault(key, set()).add(row["shape"])
    every_shape = max(len(s) for s in shapes.values())
    best = min((key for key in totals if len(shapes[key]) == every_shape), key=totals.get)
    return dict(zip(sweep_spec, best))


def gbps(shape, tensors_moved: int, ms: float) -> float:
    return round(tensors_moved * 2 * torch.Size(shape).numel() / ms / 1e6, 1)


def sweep(sweep_spec: dict):
    keys = list(sweep_spec)
    for values in itertools.product(*(sweep_spec[k] for k in keys)):
        yield dict(zip(keys, values))


def median_ms(fn) -> float:
    """``triton.testing.do_bench``'s median of ``fn`` in ms (needs a GPU)."""
    import triton.testing
    return round(triton.testing.do_bench(fn, warmup=10, rep=50), 4)


def launch_configs(shipped_only: bool, first: dict, second: dict):
    """``(config, first kernel timed, second kernel timed)``: the shipped launch settings
    for both kernels, or each kernel's own sweep with the other's keys left as shipped."""
    if shipped_only:
        return [({}, True, True)]
    return [*((c, True, False) for c in sweep(first)), *((c, False, True) for c in sweep(second))]


def write_result(rows: list[dict], best: dict | None, json_path: Path | None) -> None:
    """Print the sweep's best configuration and write everything to ``json_path``."""
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if best is not None:
        result["best_config"] = best
        print("best_config", json.dumps(best), flush=True)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, result)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_dwconv.py needs a CUDA GPU")
    from kernels.depthwise_conv import triton_dwconv as kernels

    default = dict(kernels.CONFIG)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        base = cudnn_times(shape, median_ms)
        rows.append({"shape": name, "dims": shape, "impl": "cudnn+gelu", **base,
                     "fwd_GBps": gbps(shape, 2, base["fwd_ms"]), "bwd_GBps": gbps(shape, 3, base["bwd_ms"])})
        print(rows[-1], flush=True)
        for config, row_kernels, reduction_kernel in launch_configs(args.shipped_only, ROW_SWEEP,
                                                                    REDUCTION_SWEEP):
            kernels.CONFIG.update(default, **config)
            times = fused_times(shape, kernels, median_ms, row_kernels, reduction_kernel)
            rates = {f"{key[:-3]}_GBps": gbps(shape, 2 if key == "fwd_ms" else 3, ms) for key, ms in times.items()}
            rows.append({"shape": name, "dims": shape, "impl": "fused", "config": dict(kernels.CONFIG),
                         **times, **rates})
            print(rows[-1], flush=True)
        kernels.CONFIG.update(default)
    best = None if args.shipped_only else {**best_config(rows, ROW_SWEEP, ("fwd_ms", "bwd_pre_ms")),
                                            **best_config(rows, REDUCTION_SWEEP, ("bwd_input_weight_ms",))}
    write_result(rows, best, args.json)
    return rows


if __name__ == "__main__":
    main()
