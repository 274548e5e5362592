"""CPU throughput of a GroupMamba variant with the pure-PyTorch scan: forward, or training.

    python bench/bench_cpu.py                      # groupmamba_tiny, 224 px, batch 8
    python bench/bench_cpu.py --model groupmamba_small --batch-size 4 --repeats 5
    python bench/bench_cpu.py --train --grad-checkpointing --batch-size 64 --warmup 1 --repeats 1

Prints the median images per second over ``--repeats`` timed batches (after
``--warmup`` untimed ones) and the process's peak resident memory (what ``/usr/bin/time
-v`` reports as "Maximum resident set size") and, with ``--json``, writes the figures
there. ``--train`` times fp32 training steps (forward, backward, AdamW) as train.py runs
them on a CPU; ``--grad-checkpointing`` recomputes the blocks in the backward.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import models


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="groupmamba_tiny")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--train", action="store_true", help="time training steps instead of forwards")
    parser.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="with --train: recompute each block's activations in the backward")
    parser.add_argument("--json", type=Path, default=None, help="write the result here as JSON")
    return parser.parse_args(argv)


def time_forward(model: torch.nn.Module, batch: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Seconds per forward pass of ``batch``, one entry per timed repeat."""
    seconds = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(batch)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    return seconds


def time_train_step(model: torch.nn.Module, batch: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Seconds per fp32 training step (forward, both heads' loss, backward, AdamW), one entry
    per timed repeat."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(0, 1000, (batch.shape[0],))
    model.train()
    seconds = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        outputs = model(batch)
        heads = outputs if isinstance(outputs, tuple) else (outputs,)
        loss = sum(torch.nn.functional.cross_entropy(head, labels) for head in heads) / len(heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.create_model(args.model, num_classes=1000, scan_backend="torch").eval()
    model.set_grad_checkpointing(args.grad_checkpointing)
    batch = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    timed = time_train_step if args.train else time_forward
    seconds = timed(model, batch, args.warmup, args.repeats)
    median = statistics.median(seconds)
    step = "fp32 training step" + (", gradient checkpointing" if args.grad_checkpointing else "")
    result = {
        "model": args.model,
        "measured": step if args.train else "forward",
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "scan_backend": "torch",
        "median_s_per_batch": round(median, 4),
        "img_per_s": round(args.batch_size / median, 2),
        "repeats": args.repeats,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    print(f"{args.model} {args.img_size}px batch {args.batch_size}, {result['measured']}: "
          f"{result['img_per_s']} img/s (median of {args.repeats}, {median * 1000:.0f} ms/batch, "
          f"{result['threads']} threads, torch {torch.__version__}); peak RSS {result['peak_rss_gib']} GiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
