"""GPU throughput of GroupMamba variants: training step, inference, memory, launches.

    python bench/bench_model.py                                   # tiny, every GPU backend
    python bench/bench_model.py --models groupmamba_tiny groupmamba_small \
        --backends cuda --json bench/results/h200.json

For each model and scan backend it measures, on one GPU, with synthetic data:

- training images/s: forward + backward + AdamW step under bf16 autocast
  (``--train-batch``, default 128, at ``--img-size``, default 224);
- inference images/s: eval forward under bf16 autocast (``--infer-batch``, 256);
- peak memory of the training step (``torch.cuda.max_memory_allocated``);
- CUDA kernel launches per training step (counted with ``torch.profiler``).

Times are medians over ``--repeats`` windows of ``--steps`` steps each, after warm-up,
with CUDA events around each window.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402  (registers the GroupMamba variants with timm)
from kernels.selective_scan import available_backends  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["groupmamba_tiny"])
    parser.add_argument("--backends", nargs="+", default=["torch", "triton", "cuda"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="steps in one timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is kept")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


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


def count_kernel_launches(step) -> int:
    """CUDA kernels (and memsets/copies) that one call of ``step`` puts on the GPU."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def make_train_step(model, images, labels):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images)
            logits = out if isinstance(out, torch.Tensor) else out[0]
            loss = loss_fn(logits.float(), labels)
            if not isinstance(out, torch.Tensor):
                loss = (loss + loss_fn(out[1].float(), labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_one(name: str, backend: str, args) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=args.num_classes, scan_backend=backend).to(device)
    size = args.img_size
    images = torch.randn(args.train_batch, 3, size, size, device=device)
    labels = torch.randint(0, args.num_classes, (args.train_batch,), device=device)

    model.train()
    train_step = make_train_step(model, images, labels)
    torch.cuda.reset_peak_memory_stats()
    train_s = median_window_seconds(train_step, args.warmup, args.steps, args.repeats)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    launches = count_kernel_launches(train_step)

    model.eval()
    infer_images = torch.randn(args.infer_batch, 3, size, size, device=device)

    def infer_step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(infer_images)
    infer_s = median_window_seconds(infer_step, args.warmup, args.steps, args.repeats)
    del model, train_step
    torch.cuda.empty_cache()
    return {
        "model": name, "backend": backend, "img_size": size,
        "train_batch": args.train_batch, "train_img_s": round(args.train_batch / train_s, 1),
        "train_step_ms": round(train_s * 1000, 2), "peak_train_mem_gib": round(peak_gib, 2),
        "launches_per_train_step": launches,
        "infer_batch": args.infer_batch, "infer_img_s": round(args.infer_batch / infer_s, 1),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py needs a CUDA GPU")
    unavailable = {b: why for b, why in available_backends().items() if why is not None}
    rows = []
    for name in args.models:
        for backend in args.backends:
            if backend in unavailable:
                print(f"skip {name}/{backend}: {unavailable[backend]}")
                continue
            rows.append(bench_one(name, backend, args))
            print(json.dumps(rows[-1]), flush=True)
    header = ("model", "backend", "train_img_s", "train_step_ms", "peak_train_mem_gib",
              "launches_per_train_step", "infer_img_s")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[key]) for key in header))
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "python bench/bench_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "precision": "bf16 autocast, fp32 scan, AdamW(fused)", "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
