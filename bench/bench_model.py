"""GPU throughput of GroupMamba variants: training step, inference, memory, launches.

    python bench/bench_model.py                                   # groupmamba_tiny, eager
    python bench/bench_model.py --compile --cuda-graph --json bench/results/h100.json
    python bench/bench_model.py --models groupmamba_small groupmamba_base --compile --cuda-graph

The speed options are train.py's (``--scan-backend``, ``--compile``, ``--cuda-graph``,
``--low-memory``, ``--grad-checkpointing``, decided by ``utils.accel.plan_speed``), so a
row measures what a training run with the same flags runs (the fused kernels included:
on with a CUDA graph or ``--low-memory``; ``--unfused`` measures PyTorch's ops in their
place). For each model, on one GPU, with synthetic data:

- training images/s: forward + backward + AdamW step under bf16 autocast
  (``--train-batch``, default 128, at ``--img-size``, default 224);
- inference images/s: eval forward under bf16 autocast (``--infer-batch``, 256);
- peak memory of the training step (``torch.cuda.max_memory_allocated``);
- CUDA kernel launches and summed kernel GPU time per step (``torch.profiler``).

Times are medians over ``--repeats`` windows of ``--steps`` steps each, after warm-up,
with CUDA events around each window. ``--extra-train SIZE:BATCH`` adds training rows
for the first model at other sizes (default 160 px at batch 256). With ``--cuda-graph``
the training step (AdamW with ``capturable=True``) and the inference forward are each
captured in one CUDA graph; compiled rows record torch's compile timers by phase
(``compile_s_train``, ``compile_s_infer``) and ``first_train_step_s`` includes the
compiling. ``--profile N`` prints the N kernels with the most GPU time, ``--kernels-json``
writes all of them; ``--dwconv-config``, ``--grid-scan-config`` and
``--inductor-config`` set the Triton kernels' launch settings and inductor options
(``bench/bench_dwconv.py`` and ``bench/bench_grid_scan.py`` print their sweeps' best).

With ``--json`` the file also gets the headline keys of groupmamba_tiny at 224 px
(``train_img_s_tiny_224_bs128``, ...); other keys already in the file (e.g. the
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
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch._inductor.config as inductor_config

import models
from utils.accel import SpeedPlan, compile_regions, compile_seconds, plan_speed, set_grad_checkpointing
from utils.compile_cache import resolve_cache_dir, use_cache_dir
from utils.config import add_speed_arguments, choose_scan_backend
from utils.cuda_graphs import capture
from utils.distributed import DistEnv
from utils.images import atomic_write_json, update_json


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["groupmamba_tiny"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="steps in one timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is kept")
    parser.add_argument("--extra-train", nargs="*", default=["160:256"], metavar="SIZE:BATCH",
                        help="more training-only rows for the first model")
    parser.add_argument("--train-only", action="store_true",
                        help="no inference part (saves its compile when comparing training variants)")
    parser.add_argument("--json", type=Path, default=None, help="write (update) the results here")
    add_speed_arguments(parser, switch_default="off")
    expert = parser.add_argument_group("kernels and profiles")
    expert.add_argument("--unfused", action="store_true",
                        help="PyTorch's ops where the plan would run the fused kernels: the baseline they are "
                             "measured against")
    expert.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N kernels with the most GPU time per training (and inference) step")
    expert.add_argument("--kernels-json", type=Path, default=None,
                        help="write every kernel of each profiled step here (name, ms, calls), one entry per row")
    expert.add_argument("--dwconv-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="launch settings of the fused conv kernels, e.g. rows_per_program=16")
    expert.add_argument("--grid-scan-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="launch settings of the grid scan's kernels, e.g. fwd_block_t=64")
    expert.add_argument("--inductor-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings to try, e.g. padding_stride_threshold=256 "
                             "(values are Python literals)")
    args = parser.parse_args(argv)
    try:
        args.scan_backend = choose_scan_backend(args.scan_backend)
        args.inductor_config = inductor_settings(args.inductor_config)
        args.dwconv_config = launch_settings(args.dwconv_config, "--dwconv-config")
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


def launch_settings(items: list[str], flag: str) -> dict:
    """``KEY=VALUE`` strings -> ``{key: value}`` for a Triton module's launch CONFIG (the
    keys are checked in :func:`main`: importing the kernels needs a GPU)."""
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


def speed_plan(name: str, args) -> SpeedPlan:
    """What train.py with these speed flags would run for model ``name`` on this GPU."""
    request = SimpleNamespace(model=name, scan_backend=args.scan_backend, compile=args.compile,
                              cuda_graph=args.cuda_graph, low_memory=args.low_memory,
                              grad_checkpointing=args.grad_checkpointing, teacher=None)
    plan = plan_speed(request, DistEnv(device=torch.device("cuda")), grad_scaling=False)
    if plan.compile is not False:  # --compile auto compiles a run long enough to pay: a benchmark's steady state
        use_cache_dir(resolve_cache_dir(args.compile_cache))
    return replace(plan, compile=plan.compile is not False, fused_kernels=plan.fused_kernels and not args.unfused)


def mode_name(plan: SpeedPlan) -> str:
    return "+".join([m for m, on in (("compile", plan.compile), ("cuda-graph", plan.cuda_graph),
                                     ("fused", plan.fused_kernels)) if on]) or "eager"


def first_call_seconds(step) -> float:
    """Wall time of the first call (compiling included, for compiled modes)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_train(model, args, size: int, train_batch: int, graphed: bool) -> tuple[dict, list]:
    """The training figures of one row, and the profiled step's kernel table."""
    device = torch.device("cuda")
    images = torch.randn(train_batch, 3, size, size, device=device)
    labels = torch.randint(0, args.num_classes, (train_batch,), device=device)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_step = make_train_step(model, model.parameters(), images, labels, graphed)
    first_s = first_call_seconds(train_step) + time.perf_counter() - start
    train_s = median_window_seconds(train_step, args.warmup, args.steps, args.repeats)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    launches, gpu_ms, kernel_table = profile_step(train_step)
    print_profile(f"{size}px bs{train_batch}: {launches} kernels, training", gpu_ms, kernel_table, args.profile)
    return {"train_img_s": round(train_batch / train_s, 1), "train_step_ms": round(train_s * 1000, 2),
            "peak_train_mem_gib": round(peak_gib, 2), "launches_per_train_step": launches,
            "gpu_ms_per_train_step": round(gpu_ms, 2), "first_train_step_s": round(first_s, 1)}, kernel_table


def measure_infer(model, args, size: int, graphed: bool) -> tuple[dict, list]:
    """The inference figures of one row, and the profiled step's kernel table."""
    model.eval()
    images = torch.randn(args.infer_batch, 3, size, size, device="cuda")

    def infer_step():
        # plain no_grad under capture: inference tensors gain nothing in a graph
        no_grad = torch.no_grad() if graphed else torch.inference_mode()
        with no_grad, torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed):
            model(images)
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


def bench_one(name: str, args, size: int, train_batch: int, infer: bool = True) -> tuple[dict, dict]:
    """One row, and the kernel tables of its profiled steps (``train``, ``infer``); a compile
    or capture that fails is a finding (the row's ``error``), not a crash."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # each row compiles afresh (and pays for it)
    plan = speed_plan(name, args)
    row = {"model": name, "scan_backend": plan.scan_backend, "mode": mode_name(plan),
           "fused_kernels": plan.fused_kernels, "low_memory": plan.low_memory,
           "grad_checkpointing": plan.grad_checkpointing, "img_size": size, "train_batch": train_batch}
    row.update({key: value for key in ("dwconv_config", "grid_scan_config", "inductor_config")
                if (value := getattr(args, key))})
    if args.profile:
        print(f"--- {name} {row['mode']}", flush=True)
    model = models.create_model(name, num_classes=args.num_classes, scan_backend=plan.scan_backend,
                                fused_kernels=plan.fused_kernels).cuda()
    set_grad_checkpointing(model, plan)
    tables = {}
    try:
        if plan.compile:
            compile_regions([model], plan)
        before = compile_seconds()
        figures, tables["train"] = measure_train(model, args, size, train_batch, plan.cuda_graph)
        row.update(figures)
        after_train = compile_seconds()
        if infer:
            figures, tables["infer"] = measure_infer(model, args, size, plan.cuda_graph)
            row.update(figures)
        if plan.compile:
            row["compile_s_train"] = seconds_between(before, after_train)
            if infer:
                row["compile_s_infer"] = seconds_between(after_train, compile_seconds())
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    del model
    torch.cuda.empty_cache()
    return row, tables


def headline(rows: list[dict], model: str = "groupmamba_tiny") -> dict:
    """DESIGN.md's keys from ``model``'s rows (224 px at batch 128, 160 px at batch 256)."""
    def find(key, img_size, train_batch):
        return next((r for r in rows if r["model"] == model and r["img_size"] == img_size and key in r
                     and r["train_batch"] == train_batch), None)

    out = {}
    train = find("train_img_s", 224, 128)
    if train:
        out.update(train_img_s_tiny_224_bs128=train["train_img_s"],
                   peak_mem_gib_tiny_224_bs128=train["peak_train_mem_gib"],
                   launches_per_train_step_tiny=train["launches_per_train_step"], headline_mode=train["mode"])
    small = find("train_img_s", 160, 256)
    if small:
        out["train_img_s_tiny_160_bs256"] = small["train_img_s"]
    infer = find("infer_img_s", 224, 128)
    if infer:
        out["infer_img_s_tiny_224_bs256"] = infer["infer_img_s"]
    return out


def print_table(rows: list[dict]) -> None:
    header = ("model", "scan_backend", "mode", "low_memory", "img_size", "train_batch", "train_img_s",
              "train_step_ms", "gpu_ms_per_train_step", "peak_train_mem_gib", "launches_per_train_step",
              "first_train_step_s", "infer_img_s")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row.get(key, "-")) for key in header))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py needs a CUDA GPU")
    for key, value in args.inductor_config.items():
        setattr(inductor_config, key, value)
    apply_launch_settings("kernels.depthwise_conv.triton_dwconv", args.dwconv_config, "--dwconv-config")
    apply_launch_settings("kernels.grid_scan.triton_grid_scan", args.grid_scan_config, "--grid-scan-config")
    rows, kernel_tables = [], []

    def add(row: dict, tables: dict):
        if tables:
            kernel_tables.append({**{k: row[k] for k in ("model", "mode", "img_size", "train_batch")},
                                  **{what: [{"name": n, "ms": round(ms, 4), "calls": c} for n, ms, c in table]
                                     for what, table in tables.items()}})
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in args.models:
        add(*bench_one(name, args, args.img_size, args.train_batch, infer=not args.train_only))
    for size, batch in args.extra_train:
        add(*bench_one(args.models[0], args, size, batch, infer=False))
    print_table(rows)
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "python bench/bench_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "precision": "bf16 autocast, fp32 scan math (bf16 inputs), AdamW(fused)", "rows": rows,
    }
    if (args.train_batch, args.infer_batch) == (128, 256):
        result.update(headline(rows))
    if args.json:
        update_json(args.json, result)
    if args.kernels_json:
        atomic_write_json(args.kernels_json, {"command": result["command"], "gpu": result["gpu"],
                                              "rows": kernel_tables})
    return result


if __name__ == "__main__":
    main()
