"""Time the selective-scan backends on GroupMamba's stage shapes.

    python bench/bench_scan.py [--json out.json] [--sweep] [--backends torch,triton,cuda]

fp32, N=1, G=1, with delta_softplus, delta_bias and D (as GroupMamba's SS2D calls
the scan). Two kinds of number per backend and shape:

- kernel time (``fwd_us``, ``bwd_us``; the targets apply to these): the backend's
  forward / backward function (kernels plus the zero-fills and casts it launches)
  captured in a CUDA graph over K input sets (K chosen so the sets total >= 150 MB,
  about 2.5x the H200's L2, so every call reads from DRAM); median graph replay
  time / K, after warm-up. This is GPU time without the Python launch cost.
- eager call time (``eager_fwd_us``, ``eager_fwd_bwd_us``): ``selective_scan_fn``
  (and ``.backward``) called from Python, median by ``triton.testing.do_bench``
  (CUDA events, L2 flushed before each call). When this exceeds the kernel time the
  call is bound by the CPU launch path.

Forward effective bandwidth counts u, delta and y (4 bytes each, B*D*L) plus B and C
(4 bytes each, B*G*N*L), each moved once, over the forward kernel time.
``--sweep`` also times other launch configurations of the Triton and CUDA kernels
(chunk length, channels per program, warps; items per thread, warps per row).
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys

import torch

from kernels.selective_scan import available_backends, selective_scan_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(128, 16, 3136), (128, 32, 784), (128, 87, 196), (128, 112, 49)]
# one H200, official GroupMamba kernel (DESIGN.md): forward / backward microseconds
TARGET_FWD_US = {3136: 55.0, 784: 27.0, 196: 18.0, 49: 13.0}
TARGET_BWD_US = {3136: 130.0, 784: 76.0, 196: 61.0, 49: 61.0}
TARGET_STAGE1_TBPS = 2.5


def make_inputs(batch, dim, length, device="cuda", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=gen)
    delta = 0.5 * torch.randn(batch, dim, length, generator=gen)
    A = -torch.exp(0.5 * torch.randn(dim, 1, generator=gen))
    B = torch.randn(batch, 1, 1, length, generator=gen)
    C = torch.randn(batch, 1, 1, length, generator=gen)
    D = torch.ones(dim) + 0.1 * torch.randn(dim, generator=gen)
    dt0 = torch.exp(torch.rand(dim, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = dt0 + torch.log(-torch.expm1(-dt0))
    return [t.to(device) for t in (u, delta, A, B, C, D, bias)]


def fwd_bytes(batch, dim, length, groups=1, n_state=1, elem=4):
    return elem * (3 * batch * dim * length + 2 * batch * groups * n_state * length)


def _event_bench(fn, warmup_ms, rep_ms):
    """Median event time in ms, L2 flushed before each call (do_bench's method)."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm = max(1, int(warmup_ms / est))
    n_rep = max(10, int(rep_ms / est))
    for _ in range(n_warm):
        fn()
    times = []
    for _ in range(n_rep):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def bench_ms(fn, warmup_ms=25, rep_ms=100):
    try:
        from triton.testing import do_bench
    except ImportError:
        return _event_bench(fn, warmup_ms, rep_ms)
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def _impls(name):
    """(fwd, bwd) plain functions of a backend (no autograd), or None for the reference."""
    if name == "triton":
        from kernels.selective_scan import triton_scan as mod
    elif name == "cuda":
        from kernels.selective_scan import cuda_scan as mod
    else:
        return None
    return mod._fwd, mod._bwd


def graph_us(calls, reps=30):
    """Median time of one call in microseconds: all ``calls`` captured in one CUDA
    graph (after warm-up on a side stream), the graph replayed ``reps`` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) * 1e3 / len(calls)


def input_sets(batch, dim, length, min_bytes=150e6, max_sets=16):
    per_set = 4 * batch * dim * length * 3
    count = int(min(max_sets, max(1, math.ceil(min_bytes / per_set))))
    sets = []
    for k in range(count):
        args = make_inputs(batch, dim, length, seed=k)
        dy = torch.randn(batch, dim, length, device="cuda")
        sets.append((args, dy))
    return sets


def time_kernels(name, sets, fwd_kw=None, bwd_kw=None, which=("fwd", "bwd")):
    """(fwd us, bwd us) of a backend's kernels by graph replay; None where not capturable
    or not asked for (``which``)."""
    impls = _impls(name)
    fwd_kw = fwd_kw or {}
    bwd_kw = bwd_kw or {}
    if impls is not None:
        fwd, bwd = impls
        fwd_calls = [lambda a=a: fwd(*a, True, **fwd_kw) for a, _ in sets]
        bwd_calls = [lambda a=a, d=d: bwd(d, *a, True, **bwd_kw) for a, d in sets]
    else:  # the reference: forward, and the autograd backward of a saved graph
        fwd_calls = [lambda a=a: selective_scan_fn(*a, delta_softplus=True, backend=name)
                     for a, _ in sets]
        bwd_calls = []
        for a, d in sets:
            leaves = [t.clone().requires_grad_() for t in a]
            y = selective_scan_fn(*leaves, delta_softplus=True, backend=name)
            bwd_calls.append(lambda y=y, leaves=leaves, d=d:
                             torch.autograd.grad(y, leaves, d, retain_graph=True))
    out = []
    for kind, calls in (("fwd", fwd_calls), ("bwd", bwd_calls)):
        if kind not in which:
            out.append(None)
            continue
        try:
            out.append(graph_us(calls))
        except Exception as exc:  # e.g. autograd of the reference runs outside the capture
            torch.cuda.synchronize()
            print(f"  ({name} {kind}: no graph capture ({type(exc).__name__}); timed eagerly)")
            out.append(bench_ms(calls[0], rep_ms=50) * 1e3)
    return tuple(out)


def time_eager(name, args, dy, rep_ms):
    """(forward call us, forward+backward call us) from Python, do_bench medians."""
    u, delta, A, B, C, D, bias = args
    fwd = lambda: selective_scan_fn(u, delta, A, B, C, D, bias, True, backend=name)  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in args]

    def fwd_bwd():
        selective_scan_fn(*leaves, delta_softplus=True, backend=name).backward(dy)

    return bench_ms(fwd, rep_ms=rep_ms) * 1e3, bench_ms(fwd_bwd, rep_ms=rep_ms) * 1e3


def time_autograd_floor(args, dy, rep_ms):
    """Eager forward+backward of a trivial elementwise op over the same seven leaves:
    the PyTorch autograd/launch cost any scan call pays on this machine."""
    leaves = [t.clone().requires_grad_() for t in args]

    def fwd_bwd():
        u, delta, A, B, C, D, bias = leaves
        extra = A.sum() + B.sum() + C.sum() + D.sum() + bias.sum()
        (u * delta + extra).backward(dy)

    return bench_ms(fwd_bwd, rep_ms=rep_ms) * 1e3


def check_agreement(names, args, dy):
    """Max relative error of each backend's y and grads against the first one listed."""
    outs = {}
    for name in names:
        leaves = [t.clone().requires_grad_() for t in args]
        y = selective_scan_fn(*leaves, delta_softplus=True, backend=name)
        grads = torch.autograd.grad(y, leaves, dy)
        outs[name] = [y.detach(), *grads]
    base = outs[names[0]]
    result = {}
    for name in names[1:]:
        errs = [((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
                for a, b in zip(outs[name], base)]
        result[name] = max(errs)
    return result


def sweep(sets, have):
    """Kernel times (graph replay) of other launch configurations."""
    length = sets[0][0][0].shape[2]
    rows = []

    def record(backend, kind, config, kw):
        try:
            if kind == "fwd":
                us = time_kernels(backend, sets, fwd_kw=kw, which=("fwd",))[0]
            else:
                us = time_kernels(backend, sets, bwd_kw=kw, which=("bwd",))[1]
            rows.append({"backend": backend, "kind": kind, "config": config, "us": us})
        except Exception as exc:  # a configuration the compiler rejects
            torch.cuda.synchronize()
            rows.append({"backend": backend, "kind": kind, "config": config,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})

    if "triton" in have:
        from kernels.selective_scan.triton_scan import candidate_configs
        for kind in ("fwd", "bwd"):
            for cfg in candidate_configs(length, 1, kind):
                record("triton", kind, list(cfg), {"config": cfg})
    if "cuda" in have:
        for items in (4, 8, 16):
            for row_warps in (1, 4):
                record("cuda", "fwd", {"items": items, "row_warps": row_warps},
                       {"items": items, "row_warps": row_warps})
        for items in (4, 8):
            record("cuda", "bwd", {"items": items}, {"items": items})
    return rows


def bench_shape(shape: tuple[int, int, int], have: list[str], opts, record: dict) -> None:
    """Time every backend in ``have`` at one ``(batch, dim, length)``; rows go to ``record``."""
    batch, dim, length = shape
    key = f"B{batch}-D{dim}-L{length}"
    sets = input_sets(batch, dim, length)
    args, dy = sets[0]
    if len(have) > 1:
        record["agreement_max_rel_err"][key] = check_agreement(have, args, dy)
    nbytes = fwd_bytes(batch, dim, length)
    floor_us = time_autograd_floor(args, dy, opts.rep_ms)
    record.setdefault("eager_autograd_floor_us", {})[key] = floor_us
    print(f"{key:>16} eager fwd+bwd of a trivial op on the same 7 leaves: {floor_us:.1f} us")
    for name in have:
        fwd_us, bwd_us = time_kernels(name, sets if name != "torch" else sets[:1])
        eager_fwd_us, eager_fwd_bwd_us = time_eager(name, args, dy, opts.rep_ms)
        row = {"shape": key, "batch": batch, "dim": dim, "length": length, "backend": name,
               "fwd_us": fwd_us, "bwd_us": bwd_us, "input_sets": len(sets),
               "fwd_bytes": nbytes, "fwd_TBps": nbytes / (fwd_us * 1e-6) / 1e12 if fwd_us else None,
               "eager_fwd_us": eager_fwd_us, "eager_fwd_bwd_us": eager_fwd_bwd_us,
               "fwd_target_us": TARGET_FWD_US[length], "bwd_target_us": TARGET_BWD_US[length]}
        record["results"].append(row)
        fmt = lambda v: f"{v:9.1f}" if v is not None else "      n/a"  # noqa: E731
        print(f"{key:>16} {name:>7}: kernel fwd {fmt(fwd_us)} us  bwd {fmt(bwd_us)} us | eager "
              f"fwd {eager_fwd_us:8.1f} us  fwd+bwd {eager_fwd_bwd_us:8.1f} us", flush=True)
    if opts.sweep:
        rows = sweep(sets, have)
        record["sweep"][key] = rows
        for kind in ("fwd", "bwd"):
            for backend in ("triton", "cuda"):
                cand = [r for r in rows if r["kind"] == kind and r["backend"] == backend
                        and r.get("us") is not None]
                if cand:
                    best = min(cand, key=lambda r: r["us"])
                    print(f"{key:>16} sweep {backend:>6} {kind}: best {best['us']:.1f} us with "
                          f"{best['config']} (of {len(cand)})", flush=True)
    del sets, args, dy
    torch.cuda.empty_cache()


def print_table(record: dict, have: list[str]) -> None:
    print()
    print("| shape | backend | fwd us (target) | fwd TB/s | bwd us (target) | eager fwd us | eager fwd+bwd us |")
    print("|---|---|---|---|---|---|---|")
    for r in record["results"]:
        def cell(v, target):
            if v is None:
                return "n/a"
            return f"{v:.1f} ({target:.0f}, {'ok' if v <= target else 'MISS'})"
        tbps = f"{r['fwd_TBps']:.2f}" if r["fwd_TBps"] else "n/a"
        print(f"| {r['shape']} | {r['backend']} | {cell(r['fwd_us'], r['fwd_target_us'])} | {tbps} | "
              f"{cell(r['bwd_us'], r['bwd_target_us'])} | {r['eager_fwd_us']:.1f} | "
              f"{r['eager_fwd_bwd_us']:.1f} |")
    if record["agreement_max_rel_err"]:
        print("max rel. difference vs", have[0], ":", json.dumps(record["agreement_max_rel_err"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--backends", default="torch,triton,cuda", help="comma-separated backends")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time per measurement")
    parser.add_argument("--sweep", action="store_true", help="also time other kernel launch configurations")
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_scan.py needs a CUDA GPU")

    reasons = available_backends()
    wanted = [b.strip() for b in opts.backends.split(",") if b.strip()]
    have = [b for b in wanted if reasons.get(b) is None]
    for b in wanted:
        if b not in have:
            print(f"skipping backend {b}: {reasons.get(b)}")

    props = torch.cuda.get_device_properties(0)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": props.name, "sm_count": props.multi_processor_count,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "method": "kernel: CUDA-graph replay over K input sets (>=150 MB), median/K; eager: "
                  "triton.testing.do_bench median (events, L2 flushed per call); fp32, N=1, G=1, "
                  "delta_softplus + delta_bias + D",
        "targets_us": {"fwd": TARGET_FWD_US, "bwd": TARGET_BWD_US, "stage1_fwd_TBps": TARGET_STAGE1_TBPS},
        "results": [], "agreement_max_rel_err": {}, "sweep": {},
    }
    try:
        import triton
        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None

    for shape in SHAPES:
        bench_shape(shape, have, opts, record)
    print_table(record, have)
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as fh:
            json.dump(record, fh, indent=1)
        print("wrote", opts.json)


if __name__ == "__main__":
    main()
