"""The fused depth-wise conv kernels (``kernels.depthwise_conv``) against cuDNN, per launch config.

    python bench/bench_dwconv.py                  # GroupMamba-tiny's feed-forward shapes, batch 128
    python bench/bench_dwconv.py --json results/bench_dwconv_h200.json
    python bench/bench_dwconv.py --shipped-only --shapes stage1 stage2 stage3

For each shape ``(B, H, W, C)`` (bf16, channels-last, GELU): the forward
(``conv + bias + GELU``) and the backward (``dx, dw, db`` from ``dy``), once as
cuDNN's depth-wise conv with PyTorch's GELU (autograd keeps the conv's output),
and once as the fused kernels (the backward recomputes the conv) under each
launch configuration of ``triton_dwconv.CONFIG`` swept here. Times are
``triton.testing.do_bench`` medians in ms; ``GB/s`` counts one read of each input
and one write of each output (the traffic floor), so it can be compared to the
GPU's memory bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.images import atomic_write_json  # noqa: E402

SHAPES = {"stage1": (128, 56, 56, 512), "stage2": (128, 28, 28, 1024), "stage3": (128, 14, 14, 1392)}
ROW_SWEEP = {"max_block_w": (16, 64), "row_block_c": (32, 64, 128), "row_warps": (4, 8)}
REDUCTION_SWEEP = {"max_block_w": (16, 64), "reduction_block_c": (16, 32, 64), "reduction_warps": (4, 8)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["stage1", "stage3"])
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


def fused_times(shape, kernels, do_bench) -> dict:
    x, weight, bias, dy = _inputs(shape)
    g, _ = kernels.dwconv_act_bwd_pre(dy, x, weight, bias, "gelu", recompute_output=False)
    return {"fwd_ms": do_bench(lambda: kernels.dwconv_act_fwd(x, weight, bias, "gelu")),
            "bwd_pre_ms": do_bench(lambda: kernels.dwconv_act_bwd_pre(dy, x, weight, bias, "gelu", False)),
            "bwd_input_weight_ms": do_bench(lambda: kernels.dwconv_bwd_input_weight(g, x, weight))}


def gbps(shape, tensors_moved: int, ms: float) -> float:
    return round(tensors_moved * 2 * torch.Size(shape).numel() / ms / 1e6, 1)


def sweep(sweep_spec: dict):
    keys = list(sweep_spec)
    for values in itertools.product(*(sweep_spec[k] for k in keys)):
        yield dict(zip(keys, values))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_dwconv.py needs a CUDA GPU")
    import triton.testing
    from kernels.depthwise_conv import triton_dwconv as kernels

    def do_bench(fn):
        return round(triton.testing.do_bench(fn, warmup=10, rep=50), 4)

    default = dict(kernels.CONFIG)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        base = cudnn_times(shape, do_bench)
        rows.append({"shape": name, "dims": shape, "impl": "cudnn+gelu", **base,
                     "fwd_GBps": gbps(shape, 2, base["fwd_ms"]), "bwd_GBps": gbps(shape, 3, base["bwd_ms"])})
        print(rows[-1], flush=True)
        configs = [{}] if args.shipped_only else itertools.chain(sweep(ROW_SWEEP), sweep(REDUCTION_SWEEP))
        for config in configs:
            kernels.CONFIG.update(default, **config)
            times = fused_times(shape, kernels, do_bench)
            rows.append({"shape": name, "dims": shape, "impl": "fused", "config": dict(kernels.CONFIG), **times,
                         "fwd_GBps": gbps(shape, 2, times["fwd_ms"]),
                         "bwd_pre_GBps": gbps(shape, 3, times["bwd_pre_ms"]),
                         "bwd_input_weight_GBps": gbps(shape, 3, times["bwd_input_weight_ms"])})
            print(rows[-1], flush=True)
        kernels.CONFIG.update(default)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                      "rows": rows})
    return rows


if __name__ == "__main__":
    main()
