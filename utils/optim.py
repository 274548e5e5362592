"""AdamW and a per-step learning-rate schedule: linear warm-up, then cosine decay.

The optimizer comes from ``timm.optim.create_optimizer_v2`` (no weight decay on
biases, norm weights and whatever the model lists in ``no_weight_decay()``). The
schedule is a ``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimizer step::

    warm-up  (step < W):  lr * (r + (1 - r) * step / W)          r = warmup_ratio
    cosine   (step >= W): min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2,
                          t = (step - W) / (total - W)

Its state (a step counter and the base rates) is plain data, so it resumes exactly
from a checkpoint; the shape itself is rebuilt from the arguments, so a resumed run
with more ``--epochs`` stretches the remaining cosine over the new length, and
``set_schedule_length`` shortens a running schedule in place (train.py's
``--fit-time-limit``).
"""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float = 1e-8, **adamw_options) -> torch.optim.Optimizer:
    """``adamw_options`` go to ``torch.optim.AdamW`` (e.g. ``fused``, ``capturable``)."""
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,
                               betas=tuple(betas), eps=eps, **adamw_options)


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float,
                  warmup_ratio: float = 0.01):
    """The multiplier of the base learning rate at each optimizer step."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        t = min(1.0, t)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def lr_factor(total_steps: int, warmup_steps: int, lr: float, min_lr: float):
    """``warmup_cosine`` from learning rates (min_lr as a ratio of lr)."""
    ratio = min(1.0, min_lr / lr) if lr > 0 else 0.0
    return warmup_cosine(total_steps, warmup_steps, ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    lr: float, min_lr: float) -> LambdaLR:
    return LambdaLR(optimizer, lr_factor(total_steps, warmup_steps, lr, min_lr))


def set_schedule_length(scheduler: LambdaLR, total_steps: int, warmup_steps: int,
                        lr: float, min_lr: float) -> None:
    """Give a running ``build_scheduler`` schedule a new length; the step count is kept,
    so the cosine continues from where the new length puts it."""
    factor = lr_factor(total_steps, min(warmup_steps, total_steps // 2), lr, min_lr)
    scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)


def epochs_within_limit(history: list[dict], time_limit: float) -> int | None:
    """How many epochs in all end within ``time_limit`` seconds from the first step at
    the median time of the epochs after the first, which compiles and warms up (None
    before the second epoch). train.py's ``--fit-time-limit`` shortens the run to it."""
    times = sorted(float(r["epoch_time_s"]) for r in history[1:])
    if not times:
        return None
    per_epoch = times[len(times) // 2]
    remaining = time_limit - float(history[-1]["elapsed_s"])
    return int(history[-1]["epoch"]) + max(0, math.floor(remaining / per_epoch))
