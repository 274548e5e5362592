"""What a run minimises and how: the loss, AdamW, and a per-step learning-rate schedule
(linear warm-up, then cosine decay).

The loss is label-smoothed cross-entropy, or soft-target cross-entropy when timm's Mixup
or CutMix mixes the batches (``build_loss``).

The optimizer comes from ``timm.optim.create_optimizer_v2`` (no weight decay on
biases, norm weights and whatever the model lists in ``no_weight_decay()``). The
schedule is timm's ``CosineLRScheduler`` stepped per optimizer step
(``step_update(steps taken)``), with W warm-up steps of T in all::

    warm-up  (step < W):  lr * (r + (1 - r) * step / W)          r = WARMUP_RATIO
    cosine   (step >= W): min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2,
                          t = (step - W) / (T - W), min_lr after T

It is a function of the step count and these arguments only, so a resumed run sets it
from its step count (a resumed run with more ``--epochs`` stretches the remaining cosine
over the new length), and ``set_schedule_length`` shortens a running schedule in place
(train.py's ``--fit-time-limit``).
"""

from __future__ import annotations

import math

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from utils.config import mixup_active

WARMUP_RATIO = 0.01  # the warm-up starts at 1 % of the peak rate


def build_loss(config, num_classes: int):
    """``(Mixup or None, criterion)``: soft targets with Mixup/CutMix, else label smoothing."""
    if mixup_active(config):
        return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                     switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                     label_smoothing=config.smoothing, num_classes=num_classes), SoftTargetCrossEntropy()
    if config.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float = 1e-8, **adamw_options) -> torch.optim.Optimizer:
    """``adamw_options`` go to ``torch.optim.AdamW`` (e.g. ``fused``, ``capturable``)."""
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,
                               betas=tuple(betas), eps=eps, **adamw_options)


def _schedule_arguments(total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> dict:
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))  # at least one cosine step
    return dict(t_initial=total_steps - warmup_steps, lr_min=min(min_lr, lr), warmup_t=warmup_steps,
                warmup_lr_init=WARMUP_RATIO * lr, warmup_prefix=True, cycle_limit=1, t_in_epochs=False)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    lr: float, min_lr: float) -> CosineLRScheduler:
    """The schedule above; the optimizer's rate is set for step 0."""
    return CosineLRScheduler(optimizer, **_schedule_arguments(total_steps, warmup_steps, lr, min_lr))


def set_schedule_length(scheduler: CosineLRScheduler, total_steps: int, warmup_steps: int,
                        lr: float, min_lr: float, step: int) -> None:
    """Give a running ``build_scheduler`` schedule a new length and set the rate of
    ``step`` (the steps taken so far) on it: the cosine continues from where the new length
    puts it."""
    warmup_steps = min(warmup_steps, total_steps // 2)
    # made over stand-in groups with the running schedule's peak rates: the optimizer's own
    # record of them may be an earlier run's (restored by --resume, before a new --lr)
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": base} for base in scheduler.base_values])
    scheduler.load_state_dict(build_scheduler(stand_in, total_steps, warmup_steps, lr, min_lr).state_dict())
    scheduler.step_update(step)


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
