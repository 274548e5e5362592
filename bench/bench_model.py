"""GPU throughput of GroupMamba variants: training step, inference, memory, launches.

    python bench/bench_model.py                                   # tiny, every GPU backend
    python bench/bench_model.py --models groupmamba_tiny groupmamba_small groupmamba_base \
        --backends cuda --modes eager compile --json bench/results/h200.json

For each model, scan backend and execution mode it measures, on one GPU, with
synthetic data:

- training images/s: forward + backward + AdamW step under bf16 autocast
  (``--train-batch``, default 128, at ``--img-size``, default 224);
- inference images/s: eval forward under bf16 autocast (``--infer-batch``, 256);
- peak memory of the training step (``torch.cuda.max_memory_allocated``);
- CUDA kernel launches per training step (counted with ``torch.profiler``).

Times are medians over ``--repeats`` windows of ``--steps`` steps each, after warm-up,
with CUDA events around each window. ``--extra-train SIZE:BATCH`` adds training rows
for the first model at other sizes (default 160 px at batch 256).

Execution modes (``--modes``):

- ``eager``: the model as it is (the numerics the reference tests check);
- ``compile``: ``torch.compile(model, dynamic=False)`` (inductor fuses the elementwise
  ops, LayerNorms and layout copies around the scan custom op; same math, rounding
  differs at the last bits as with any fusion). ``first_train_step_s`` is the first step's
  time, which includes compiling;
- ``reduce-overhead``: the same plus CUDA graphs (``mode="reduce-overhead"``);
- ``cuda-graph``: the eager model, with the whole training step (forward, backward,
  AdamW with ``capturable=True``) and the inference forward each captured in one
  CUDA graph and replayed: the same kernels, numerics and memory plan as eager, but
  one launch per step instead of ~5,000. A row whose capture fails records the error;
- ``compile-blocks``: regional compilation (``utils.modeling.compile_blocks``): each
  GroupMamba block compiled in place, blocks of one shape sharing one graph, so
  compiling costs four stage shapes instead of the whole depth;
- ``compile-blocks+cuda-graph``: both: inductor's fused kernels, one launch per step.

Compiled rows record ``--memory-budget`` (the compiler's activation memory budget:
1 saves what its partitioner picks, lower values recompute activations in the
backward to save memory) and any ``--inductor-config KEY=VALUE`` settings tried.
Compiled rows record ``compile_s_train``/``compile_s_infer``: torch's own compile
timers by phase (``utils.modeling.compile_seconds``) for the training and the
inference part of the row. Each row also has ``gpu_ms_per_train_step``: the summed GPU time of the kernels of
one training step (from the profiler), the floor a launch-free step would reach;
``--profile N`` prints the N kernels that take the most of it (of the inference step too,
whose GPU time is ``gpu_ms_per_infer_step``), ``--kernels-json`` writes all of them.
``--train-only`` skips the inference part (and its compile) when comparing training
variants; ``--fused-kernels`` with ``--dwconv-config KEY=VALUE`` sets the fused conv
kernels' launch settings (``bench/bench_dwconv.py`` prints its sweep's best).
GroupMamba's scans run as the fused channels-last grid scan (``kernels.grid_scan``)
with the ``triton`` and ``auto`` backends, unless ``--sequence-scan``; each row's
``scan_layout`` says which (``grid`` or ``sequence``), and ``--grid-scan-config
KEY=VALUE`` sets the grid scan's launch settings (``bench/bench_grid_scan.py``).

With ``--json`` the file also gets the headline keys DESIGN.md asks for
(``train_img_s_tiny_224_bs128`` ...), each the fastest mode's figure for
groupmamba_tiny with the first backend; other keys already in the file (e.g. the
time-to-accuracy figures of ``bench/time_to_accuracy.py``) are kept.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402  (registers the GroupMamba variants with timm)
from kernels.selective_scan import available_backends, resolve_backend  # noqa: E402
from utils.cuda_graphs import capture  # noqa: E402
from utils.images import atomic_write_json, update_json  # noqa: E402
from utils.modeling import compile_blocks, compile_seconds  # noqa: E402

UNCOMPILED_MODES = ("eager", "cuda-graph")
MODES = UNCOMPILED_MODES + ("compile", "reduce-overhead", "compile-blocks",
                            "compile-blocks+cuda-graph")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["groupmamba_tiny"])
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda", "torch"],
                        help="scan backends; the first available one gives the headline keys "
                             "(triton: GroupMamba's layers run the grid scan, the default path on "
                             "CUDA; cuda: the extension on sequences gathered into scan order)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["eager"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="steps in one timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is kept")
    parser.add_argument("--extra-train", nargs="*", default=["160:256"], metavar="SIZE:BATCH",
                        help="more training-only rows for the first model (first backend)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N kernels with the most GPU time per training step "
                             "(and per inference step)")
    parser.add_argument("--kernels-json", type=Path, default=None,
                        help="write every kernel of each profiled step here (name, ms, calls), "
                             "one entry per row, for offline analysis")
    parser.add_argument("--train-only", action="store_true",
                        help="no inference part (saves its compile when comparing training variants)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write (update) the results here")
    parser.add_argument("--fused-kernels", action="store_true",
                        help="the depth-wise convs as fused Triton kernels that recompute them "
                             "in the backward (GroupMamba.set_fused_kernels(True)): less memory")
    parser.add_argument("--dwconv-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="launch settings of the fused conv kernels (with --fused-kernels), e.g. "
                             "rows_per_program=16, as bench/bench_dwconv.py's best_config prints them")
    parser.add_argument("--sequence-scan", action="store_true",
                        help="gather each channel group into its scan order and back around the "
                             "backend's scan (GroupMamba.set_fused_scan(False)) instead of the "
                             "fused grid scan that the triton and auto backends run")
    parser.add_argument("--grid-scan-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="launch settings of the fused grid scan, e.g. fwd_block_t=128, as "
                             "bench/bench_grid_scan.py's best_config prints them")
    compiled = parser.add_argument_group("compiled modes")
    compiled.add_argument("--memory-budget", type=float, default=1.0,
                          help="torch._functorch.config.activation_memory_budget: below 1 the "
                               "compiler recomputes activations in the backward to save memory")
    compiled.add_argument("--stage-norms", action="store_true",
                          help="compile-blocks: compile the LayerNorms that end each stage "
                               "(GroupMamba's StageEnds) as regions too (experimental, "
                               "see utils.modeling.compile_blocks)")
    compiled.add_argument("--pad-matmuls", action=argparse.BooleanOptionalAction, default=True,
                          help="compile-blocks: always pad matmuls with sizes that are not "
                               "multiples of 8 (inductor's force_shape_pad) instead of letting "
                               "inductor time each case (train.py's default too)")
    compiled.add_argument("--inductor-config", nargs="*", default=[], metavar="KEY=VALUE",
                          help="torch._inductor.config settings to try, e.g. padding_stride_threshold=256 "
                               "(values are Python literals)")
    args = parser.parse_args(argv)
    try:
        args.inductor_config = inductor_settings(args.inductor_config)
        args.dwconv_config = dwconv_settings(args.dwconv_config)
        args.grid_scan_config = launch_settings(args.grid_scan_config, "--grid-scan-config")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        args.extra_train = [tuple(int(v) for v in item.split(":")) for item in args.extra_train]
    except ValueError:
        parser.error("--extra-train takes SIZE:BATCH pairs, e.g. 160:256")
    return args


def inductor_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> ``{key: value}``, each key one of torch._inductor.config's."""
    return key_values(items, lambda key: hasattr(inductor_config, key), "--inductor-config",
                      "a torch._inductor.config setting")


def dwconv_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> ``{key: value}`` for the fused conv kernels' launch CONFIG
    (the keys are checked in :func:`main`: importing the kernels needs a GPU)."""
    return launch_settings(items, "--dwconv-config")


def launch_settings(items: list[str], flag: str) -> dict:
    """``KEY=VALUE`` strings -> ``{key: value}`` for a Triton module's launch CONFIG."""
    return key_values(items, lambda key: key.isidentifier(), flag, "a launch setting")


def apply_launch_settings(module_name: str, settings: dict, flag: str) -> None:
    """Update a Triton module's launch CONFIG (imported only when there is something to set)."""
    if not settings:
        return
    config = importlib.import_module(module_name).CONFIG
    unknown = sorted(set(settings) - set(config))
    if unknown:
        raise SystemExit(f"error: {flag}: unknown keys {unknown}; known: {', '.join(config)}")
    config.update(settings)


def scan_layout(backend: str, sequence_scan: bool) -> str:
    """``grid`` where GroupMamba's layers run the fused grid scan, else ``sequence``."""
    from kernels import grid_scan
    fused = not sequence_scan and grid_scan.fuses_backend(backend)
    return "grid" if fused else "sequence"


def key_values(items: list[str], known, flag: str, what: str) -> dict:
    """``KEY=VALUE`` strings -> ``{key: value}`` (values as Python literals), every key ``known``."""
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not known(key):
            raise ValueError(f"{flag} takes KEY=VALUE with KEY {what}, not {item!r}")
        try:
            settings[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            settings[key] = text  # a bare string, e.g. a backend name
    return settings


def median_window_seconds(step, warmup: int, steps: int, repeats: int) -> float:
    """Median seconds per call of ``step`` over ``repeats`` windows of ``steps`` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    windows = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        windows.append(start.elapsed_time(end) / 1000 / steps)
    return statistics.median(windows)


def profile_step(step) -> tuple[int, float, list[tuple[str, float, int]]]:
    """Kernels (and memsets/copies) one call of ``step`` puts on the GPU: their count,
    their summed GPU time in ms, and per kernel name (ms, calls), most time first."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name: dict[str, list] = {}
    for event in kernels:
        entry = per_name.setdefault(event.name, [0.0, 0])
        entry[0] += event.device_time / 1000
        entry[1] += 1
    table = sorted(((name, ms, n) for name, (ms, n) in per_name.items()), key=lambda r: -r[1])
    return len(kernels), sum(ms for _, ms, _ in table), table


def print_profile(what: str, gpu_ms: float, kernel_table, top: int) -> None:
    """The ``top`` kernels of one profiled step (nothing when ``top`` is 0)."""
    if not top:
        return
    print(f"{what}: {gpu_ms:.1f} ms of GPU time per step; the top {top}:")
    for kernel, ms, calls in kernel_table[:top]:
        print(f"  {ms:8.2f} ms {100 * ms / gpu_ms:5.1f} % {calls:5d}x  {kernel[:110]}")


def make_train_step(model, parameters, images, labels, graphed: bool = False):
    """One training step (bf16 autocast forward, backward, fused AdamW) as a callable;
    ``graphed``: captured once in a CUDA graph and replayed (static inputs)."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=True, capturable=graphed)
    loss_fn = torch.nn.CrossEntropyLoss()

    def forward_backward_step():
        # no autocast weight cache under capture (it would outlive the graph's pool)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed):
            out = model(images)
            logits = out if isinstance(out, torch.Tensor) else out[0]
            loss = loss_fn(logits.float(), labels)
            if not isinstance(out, torch.Tensor):
                loss = (loss + loss_fn(out[1].float(), labels)) / 2
        loss.backward()
        optimizer.step()

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward_step()

    return capture(step, forward_backward_step, optimizer.zero_grad) if graphed else step


def prepare(model: torch.nn.Module, mode: str, stage_norms: bool = False,
            pad_matmuls: bool = True) -> torch.nn.Module:
    if mode in UNCOMPILED_MODES:
        return model
    if mode.startswith("compile-blocks"):
        compile_blocks(model, stage_norms=stage_norms, pad_matmuls=pad_matmuls, dynamic=False)
        return model
    return torch.compile(model, dynamic=False,
                         mode="reduce-overhead" if mode == "reduce-overhead" else None)


def first_call_seconds(step) -> float:
    """Wall time of the first call (compiling included, for compiled modes)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_train(runner, model, args, size: int, train_batch: int, graphed: bool) -> tuple[dict, list]:
    """The training figures of one row, and the profiled step's kernel table."""
    device = torch.device("cuda")
    images = torch.randn(train_batch, 3, size, size, device=device)
    labels = torch.randint(0, args.num_classes, (train_batch,), device=device)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_step = make_train_step(runner, model.parameters(), images, labels, graphed)
    first_s = first_call_seconds(train_step) + time.perf_counter() - start
    train_s = median_window_seconds(train_step, args.warmup, args.steps, args.repeats)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    launches, gpu_ms, kernel_table = profile_step(train_step)
    print_profile(f"{size}px bs{train_batch}: {launches} kernels, training", gpu_ms, kernel_table, args.profile)
    return {"train_img_s": round(train_batch / train_s, 1), "train_step_ms": round(train_s * 1000, 2),
            "peak_train_mem_gib": round(peak_gib, 2), "launches_per_train_step": launches,
            "gpu_ms_per_train_step": round(gpu_ms, 2), "first_train_step_s": round(first_s, 1)}, kernel_table


def measure_infer(runner, model, args, size: int, graphed: bool) -> tuple[dict, list]:
    """The inference figures of one row, and the profiled step's kernel table."""
    model.eval()
    images = torch.randn(args.infer_batch, 3, size, size, device="cuda")

    def infer_step():
        # plain no_grad under capture: inference tensors gain nothing in a graph
        no_grad = torch.no_grad() if graphed else torch.inference_mode()
        with no_grad, torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed):
            runner(images)
    start = time.perf_counter()
    if graphed:
        infer_step = capture(infer_step, infer_step)
    first_s = first_call_seconds(infer_step) + time.perf_counter() - start
    infer_s = median_window_seconds(infer_step, args.warmup, args.steps, args.repeats)
    _, gpu_ms, kernel_table = profile_step(infer_step)
    print_profile(f"{size}px inference bs{args.infer_batch}", gpu_ms, kernel_table, args.profile)
    return {"first_infer_step_s": round(first_s, 1), "infer_batch": args.infer_batch,
            "infer_img_s": round(args.infer_batch / infer_s, 1),
            "gpu_ms_per_infer_step": round(gpu_ms, 2)}, kernel_table


def seconds_between(before: dict, after: dict) -> dict:
    """Compile seconds by phase spent between two ``compile_seconds()`` snapshots."""
    return {key: round(value - before.get(key, 0.0), 1) for key, value in after.items()}


def bench_one(name: str, backend: str, mode: str, args, size: int, train_batch: int,
              infer: bool = True) -> tuple[dict, dict]:
    """One row, and the kernel tables of its profiled steps (``train``, ``infer``); a compile
    or capture that fails is a finding (the row's ``error``), not a crash."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # each row compiles afresh (and pays for it)
    row = {"model": name, "backend": backend, "mode": mode, "img_size": size, "train_batch": train_batch,
           "fused_kernels": args.fused_kernels}
    if args.fused_kernels and args.dwconv_config:
        row["dwconv_config"] = args.dwconv_config
    row["scan_layout"] = scan_layout(backend, args.sequence_scan)
    if row["scan_layout"] == "grid" and args.grid_scan_config:
        row["grid_scan_config"] = args.grid_scan_config
    if mode not in UNCOMPILED_MODES:
        row["memory_budget"] = args.memory_budget
        if mode.startswith("compile-blocks"):
            row["stage_norm_regions"] = args.stage_norms
            row["pad_matmuls"] = args.pad_matmuls
        if args.inductor_config:
            row["inductor_config"] = args.inductor_config
    if args.profile:
        print(f"--- {name} {backend} {mode}", flush=True)
    model = models.create_model(name, num_classes=args.num_classes, scan_backend=backend).cuda()
    if hasattr(model, "set_fused_kernels"):
        model.set_fused_kernels(args.fused_kernels)
        model.set_fused_scan(not args.sequence_scan)
    resolve_backend(backend, torch.device("cuda"))  # imported before tracing: an import would break the graph
    graphed = mode.endswith("cuda-graph")
    tables = {}
    try:
        runner = prepare(model, mode, args.stage_norms, args.pad_matmuls)
        before = compile_seconds()
        figures, tables["train"] = measure_train(runner, model, args, size, train_batch, graphed)
        row.update(figures)
        after_train = compile_seconds()
        if infer:
            figures, tables["infer"] = measure_infer(runner, model, args, size, graphed)
            row.update(figures)
        if mode not in UNCOMPILED_MODES:
            row["compile_s_train"] = seconds_between(before, after_train)
            if infer:
                row["compile_s_infer"] = seconds_between(after_train, compile_seconds())
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    del model
    torch.cuda.empty_cache()
    return row, tables


def headline(rows: list[dict], model: str, backend: str, size: int = 224, batch: int = 128) -> dict:
    """DESIGN.md's keys: the fastest mode's figures for ``model`` with ``backend``."""
    def best(key, img_size, train_batch=None):
        pool = [r for r in rows if r["model"] == model and r["backend"] == backend
                and r["img_size"] == img_size and key in r
                and (train_batch is None or r["train_batch"] == train_batch)]
        return max(pool, key=lambda r: r[key]) if pool else None

    out = {}
    train = best("train_img_s", size, batch)
    if train:
        out.update(train_img_s_tiny_224_bs128=train["train_img_s"],
                   peak_mem_gib_tiny_224_bs128=train["peak_train_mem_gib"],
                   launches_per_train_step_tiny=train["launches_per_train_step"],
                   headline_train_mode=train["mode"])
    small = best("train_img_s", 160, 256)
    if small:
        out["train_img_s_tiny_160_bs256"] = small["train_img_s"]
    infer = best("infer_img_s", size)
    if infer:
        out.update(infer_img_s_tiny_224_bs256=infer["infer_img_s"], headline_infer_mode=infer["mode"])
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py needs a CUDA GPU")
    unavailable = {b: why for b, why in available_backends().items() if why is not None}
    backends = []
    for backend in args.backends:
        if backend in unavailable:
            print(f"skip backend {backend}: {unavailable[backend]}")
        else:
            backends.append(backend)
    if not backends:
        raise SystemExit("none of --backends can run here")
    functorch_config.activation_memory_budget = args.memory_budget
    for key, value in args.inductor_config.items():
        setattr(inductor_config, key, value)
    apply_launch_settings("kernels.depthwise_conv.triton_dwconv", args.dwconv_config, "--dwconv-config")
    apply_launch_settings("kernels.grid_scan.triton_grid_scan", args.grid_scan_config, "--grid-scan-config")
    rows = []
    kernel_tables = []

    def add(row: dict, tables: dict):
        if tables:
            kernel_tables.append({**{k: row[k] for k in ("model", "mode", "img_size", "train_batch")},
                                  **{what: [{"name": n, "ms": round(ms, 4), "calls": c} for n, ms, c in table]
                                     for what, table in tables.items()}})
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in args.models:
        for backend in backends:
            for mode in args.modes:
                add(*bench_one(name, backend, mode, args, args.img_size, args.train_batch,
                               infer=not args.train_only))
    for size, batch in args.extra_train:
        for mode in args.modes:
            add(*bench_one(args.models[0], backends[0], mode, args, size, batch, infer=False))
    header = ("model", "backend", "mode", "img_size", "train_batch", "train_img_s",
              "train_step_ms", "gpu_ms_per_train_step", "peak_train_mem_gib",
              "launches_per_train_step",
              "first_train_step_s", "infer_img_s")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row.get(key, "-")) for key in header))
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "python bench/bench_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "precision": "bf16 autocast, fp32 scan math (bf16 inputs), AdamW(fused)", "rows": rows,
    }
    if args.models[0] == "groupmamba_tiny" and (args.img_size, args.train_batch,
                                                 args.infer_batch) == (224, 128, 256):
        result.update(headline(rows, "groupmamba_tiny", backends[0], args.img_size, args.train_batch))
    if args.json:
        update_json(args.json, result)
    if args.kernels_json:
        atomic_write_json(args.kernels_json, {"command": result["command"], "gpu": result["gpu"],
                                              "rows": kernel_tables})
    return result


if __name__ == "__main__":
    main()
