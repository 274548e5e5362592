"""The loops: one training epoch, one evaluation pass, batched prediction.

``train_one_epoch`` and ``validate`` return dicts of metrics (summed over all ranks
under DDP). Models may return a tuple of heads in training mode (GroupMamba with
distillation returns ``(head, dist_head)``): without a teacher each head is trained on
the labels and the loss is their mean; with one (``distill``, a
``utils.distillation.DistillationLoss``) ``head`` learns the labels and ``dist_head``
the teacher, and the loss is DeiT's mix of the two. Accuracy uses the mean of the heads'
logits, which is what such a model returns in eval mode.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.amp import Precision
from utils.distributed import DistEnv, all_reduce_sums, unwrap_model
from utils.metrics import AverageMeter, topk_correct


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""

    def __init__(self, epoch: int, step: int, value: float):
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(f"loss is {value} at epoch {epoch}, step {step}: training "
                         "stopped (lower --lr, keep --clip-grad on, or try --amp bf16/off)")


def _heads(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _logits(outputs) -> torch.Tensor:
    heads = _heads(outputs)
    return heads[0] if len(heads) == 1 else torch.stack(heads).mean(0)


def _progress(total: int, desc: str, env: DistEnv):
    # rank 0 only; tqdm itself turns off when stderr is not a terminal
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=None if env.is_main else True)


def train_one_epoch(model: torch.nn.Module, loader, criterion: Callable,
                    optimizer: torch.optim.Optimizer, scheduler, precision: Precision,
                    env: DistEnv, epoch: int, num_classes: int, *,
                    mixup_fn: Optional[Callable] = None, ema=None, clip_grad: float = 0.0,
                    max_batches: Optional[int] = None, global_step: int = 0,
                    distill: Optional[Callable] = None) -> dict:
    """Train for one epoch (``epoch`` is 1-based, for messages). Raises
    NonFiniteLossError at the first NaN/inf loss, before the weights are touched.
    ``distill(images, outputs, targets)``, when given, replaces ``criterion`` (it wraps
    it) and runs the teacher on the same, already mixed, images under the same autocast."""
    model.train()
    loss_m, acc1_m, acc5_m, gnorm_m = (AverageMeter(n) for n in ("loss", "acc1", "acc5", "gn"))
    k5 = min(5, num_classes)
    steps = len(loader) if max_batches is None else min(len(loader), max_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = clip_grad if clip_grad > 0 else math.inf  # inf: measure, never clip
    start = time.perf_counter()
    bar = _progress(steps, f"epoch {epoch} train", env)
    for step, (images, target) in enumerate(loader, start=1):
        if step > steps:
            break
        images = images.to(env.device, non_blocking=True)
        target = target.to(env.device, non_blocking=True)
        hard_target = target
        if mixup_fn is not None:
            images, target = mixup_fn(images, target)
        with precision.autocast():
            outputs = model(images)
            if distill is not None:
                loss = distill(images, outputs, target)
            else:
                heads = _heads(outputs)
                loss = sum(criterion(h, target) for h in heads) / len(heads)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            bar.close()
            raise NonFiniteLossError(epoch, step, loss_value)

        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        scheduler.step()
        global_step += 1
        if ema is not None:
            ema.update(unwrap_model(model), step=global_step)

        n = images.shape[0]
        with torch.no_grad():
            c1, c5 = topk_correct(_logits(outputs).float(), hard_target, (1, k5))
        loss_m.update(loss_value, n)
        acc1_m.update(100.0 * c1 / n, n)
        acc5_m.update(100.0 * c5 / n, n)
        gn = float(grad_norm)
        if math.isfinite(gn):
            gnorm_m.update(gn)
        bar.set_postfix(loss=f"{loss_m.avg:.4f}", acc1=f"{acc1_m.avg:.1f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.update(1)
    bar.close()
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    elapsed = time.perf_counter() - start
    loss_sum, c1_sum, c5_sum, count = all_reduce_sums(
        [loss_m.sum, acc1_m.sum, acc5_m.sum, loss_m.count], env)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc1": c1_sum / count, "acc5": c5_sum / count,
            "images": int(count), "steps": min(step, steps) if steps else 0,
            "time_s": elapsed, "img_s": count / elapsed if elapsed > 0 else float("nan"),
            "grad_norm": gnorm_m.avg, "lr": optimizer.param_groups[0]["lr"],
            "global_step": global_step}


@torch.no_grad()
def validate(model: torch.nn.Module, loader, precision: Precision, env: DistEnv,
             num_classes: int, max_batches: Optional[int] = None,
             desc: str = "val") -> dict:
    """Cross-entropy loss, ACC1 and ACC5 (percent) over the loader, all ranks summed."""
    model.eval()
    k5 = min(5, num_classes)
    loss_sum = c1 = c5 = count = 0.0
    steps = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = _progress(steps, desc, env)
    for i, (images, target) in enumerate(loader):
        if i >= steps:
            break
        images = images.to(env.device, non_blocking=True)
        target = target.to(env.device, non_blocking=True)
        with precision.autocast():
            logits = _logits(model(images))
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        a, b = topk_correct(logits, target, (1, k5))
        c1, c5, count = c1 + a, c5 + b, count + images.shape[0]
        bar.update(1)
    bar.close()
    loss_sum, c1, c5, count = all_reduce_sums([loss_sum, c1, c5, count], env)
    n = max(count, 1.0)
    return {"loss": loss_sum / n, "acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n,
            "images": int(count)}


@torch.no_grad()
def predict_batches(model: torch.nn.Module, loader, precision: Precision,
                    device: torch.device, desc: str = "predict",
                    show_progress: bool = True) -> Iterator[tuple[torch.Tensor, tuple]]:
    """Yield ``(probabilities on the CPU, the rest of the batch)`` for each batch; the
    first element of each batch must be the image tensor."""
    model.eval()
    bar = tqdm(total=len(loader), desc=desc, leave=False, dynamic_ncols=True,
               disable=None if show_progress else True)
    for batch in loader:
        images, rest = batch[0].to(device, non_blocking=True), tuple(batch[1:])
        with precision.autocast():
            logits = _logits(model(images))
        yield logits.float().softmax(dim=1).cpu(), rest
        bar.update(1)
    bar.close()
