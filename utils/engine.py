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

from utils.amp import Precision
from utils.distributed import DistEnv, all_reduce_sums, unwrap_model
from utils.interrupt import raise_if_interrupted
from utils.metrics import AverageMeter, topk_hits
from utils.progress import EpochProgress, ProgressLines


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""

    def __init__(self, epoch: int, step: int, value: float):
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(f"loss is {value} at epoch {epoch}, step {step}: training "
                         "stopped (lower --lr, keep --clip-grad on, or try --amp bf16/off)")


# train_one_epoch's "host_ms": per step, getting and mixing the batch, launching the
# step (without a CUDA graph: running it, the loss read included), waiting for the GPU
# to finish the previous captured step, the EMA update, the device-side metrics
HOST_PHASES = ("data", "step", "wait", "ema", "metrics")


def _heads(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _logits(outputs) -> torch.Tensor:
    heads = _heads(outputs)
    return heads[0] if len(heads) == 1 else torch.stack(heads).mean(0)


def _progress(total: int, desc: str, env: DistEnv, lines: Optional[ProgressLines]) -> EpochProgress:
    # rank 0 only; the bar shows only on a terminal, the lines go to the log
    return EpochProgress(total, desc, show=env.is_main, lines=lines)


def heads_loss(criterion: Callable) -> Callable:
    """``criterion`` over a model's outputs: the mean over its heads."""
    def loss_fn(outputs, target):
        heads = _heads(outputs)
        return sum(criterion(h, target) for h in heads) / len(heads)
    return loss_fn


class _HostClock:
    """Host seconds by phase: where a step's wall time goes when the GPU is not the limit."""

    def __init__(self):
        self.seconds = dict.fromkeys(HOST_PHASES, 0.0)
        self.mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self.mark
        self.mark = now


class _LossProgress:
    """The running loss and the progress bar; stops the run at the first NaN/inf loss."""

    def __init__(self, steps: int, epoch: int, optimizer, env: DistEnv, lines: Optional[ProgressLines]):
        self.meter = AverageMeter()
        self.epoch, self.optimizer = epoch, optimizer
        self.bar = _progress(steps, f"epoch {epoch} train", env, lines)

    def record(self, step: int, value: float, n: int) -> None:
        if not math.isfinite(value):
            raise NonFiniteLossError(self.epoch, step, value)
        self.meter.update(value, n)
        self.bar.update(n, loss=f"{self.meter.avg:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")


def _eager_step(model, images, target, criterion, optimizer, precision, distill, params, max_norm,
                record_loss: Callable[[float], None]):
    """Forward, backward, clipping and the optimizer step; returns ``(outputs, grad norm)``.
    The loss is read (the step's one host sync) once the backward is queued and before the
    weights change, so a NaN stops the run before it spoils them."""
    with precision.autocast():
        outputs = model(images)
        loss = distill(images, outputs, target) if distill is not None else heads_loss(criterion)(outputs, target)
    optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    record_loss(loss.item())
    precision.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    return outputs, grad_norm


def _step_sums(outputs, hard_target: torch.Tensor, grad_norm: torch.Tensor, k5: int) -> torch.Tensor:
    """Top-1 hits, top-5 hits, the gradient norm when finite, 1 when finite (on the device)."""
    with torch.no_grad():
        finite = torch.isfinite(grad_norm)
        return torch.cat([topk_hits(_logits(outputs).float(), hard_target, (1, k5)),
                          torch.where(finite, grad_norm, 0.0).view(1).float(), finite.view(1).float()])


def train_one_epoch(model: torch.nn.Module, loader, criterion: Callable,
                    optimizer: torch.optim.Optimizer, scheduler, precision: Precision,
                    env: DistEnv, epoch: int, num_classes: int, *,
                    mixup_fn: Optional[Callable] = None, ema=None, clip_grad: float = 0.0,
                    max_batches: Optional[int] = None, global_step: int = 0,
                    distill: Optional[Callable] = None, captured_step=None,
                    lines: Optional[ProgressLines] = None) -> dict:
    """Train for one epoch (``epoch`` is 1-based, for messages). Raises
    NonFiniteLossError at the first NaN/inf loss, before the weights are touched.
    ``distill(images, outputs, targets)``, when given, replaces ``criterion`` (it wraps
    it) and runs the teacher on the same, already mixed, images under the same autocast.
    ``captured_step``: a ``utils.cuda_graphs.CapturedTrainStep`` over this model,
    criterion, optimizer and ``clip_grad`` that does forward to optimizer step in one
    CUDA graph (there a NaN loss is seen only after the optimizer step). ``lines``: also
    log the progress at intervals (:func:`utils.progress.progress_lines`)."""
    model.train()
    steps = len(loader) if max_batches is None else min(len(loader), max_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = clip_grad if clip_grad > 0 else math.inf  # inf: measure, never clip
    # summed on the device, read once at the end (a host sync per value would stall the GPU)
    sums = torch.zeros(4, device=env.device)
    start = time.perf_counter()
    batches = enumerate(loader, start=1)  # DataLoader workers start before the progress clock's thread
    clock, progress = _HostClock(), _LossProgress(steps, epoch, optimizer, env, lines)
    with progress.bar:
        # captured steps: the loss of step k is read once step k+1 is queued, so the host
        # prepares the next batch while the GPU still runs (a NaN is seen one step later;
        # in a captured step it is seen after the optimizer step anyway)
        pending = None  # (step, loss copy, batch size) not yet read
        step = 0
        for step, (images, target) in batches:
            raise_if_interrupted()
            if step > steps:
                step = steps
                break
            images = images.to(env.device, non_blocking=True)
            hard_target = target = target.to(env.device, non_blocking=True)
            if mixup_fn is not None:
                images, target = mixup_fn(images, target)
            clock.lap("data")
            if captured_step is not None:
                outputs, loss, grad_norm = captured_step(images, target)
                loss = loss.clone()  # the captured buffer is overwritten by the next replay
                clock.lap("step")
                if pending is not None:
                    progress.record(pending[0], pending[1].item(), pending[2])
                pending = (step, loss, images.shape[0])
                clock.lap("wait")
            else:
                outputs, grad_norm = _eager_step(
                    model, images, target, criterion, optimizer, precision, distill, params, max_norm,
                    lambda value, at=step, n=images.shape[0]: progress.record(at, value, n))
                clock.lap("step")
            global_step += 1
            scheduler.step_update(global_step)  # the rate of the next step
            if ema is not None:
                ema.update(unwrap_model(model), step=global_step)
            clock.lap("ema")
            sums += _step_sums(outputs, hard_target, grad_norm, min(5, num_classes))
            clock.lap("metrics")
        if pending is not None:
            progress.record(pending[0], pending[1].item(), pending[2])
            clock.lap("wait")
    return _epoch_metrics(sums, progress.meter, step, time.perf_counter() - start, optimizer, global_step,
                          clock, env)


def _epoch_metrics(sums, meter: AverageMeter, steps: int, elapsed: float, optimizer, global_step: int,
                   clock: _HostClock, env: DistEnv) -> dict:
    c1_local, c5_local, gn_sum, gn_count = sums.tolist()
    loss_sum, c1_sum, c5_sum, count = all_reduce_sums([meter.sum, c1_local, c5_local, meter.count], env)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc1": 100.0 * c1_sum / count,
            "acc5": 100.0 * c5_sum / count, "images": int(count), "steps": steps,
            "time_s": elapsed, "img_s": count / elapsed if elapsed > 0 else float("nan"),
            "grad_norm": gn_sum / gn_count if gn_count else float("nan"),
            "lr": optimizer.param_groups[0]["lr"], "global_step": global_step,
            "host_ms": {k: 1000.0 * v / max(steps, 1) for k, v in clock.seconds.items()}}


def pad_batch(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """``images`` padded with zero images up to ``size`` (a compiled model with static
    shapes would recompile for a smaller last batch); unchanged when already that big."""
    missing = 0 if size is None else size - images.shape[0]
    if missing <= 0:
        return images
    return torch.cat([images, images.new_zeros((missing,) + images.shape[1:])])


@torch.no_grad()
def validate(model: torch.nn.Module, loader, precision: Precision, env: DistEnv,
             num_classes: int, max_batches: Optional[int] = None,
             desc: str = "val", static_batch: Optional[int] = None,
             lines: Optional[ProgressLines] = None) -> dict:
    """Cross-entropy loss, ACC1 and ACC5 (percent) over the loader, all ranks summed.
    ``static_batch``: run every batch at this size (a smaller one padded, the padding's
    outputs dropped), for compiled models; in eval mode samples do not interact.
    ``lines``: as in :func:`train_one_epoch`."""
    model.eval()
    k5 = min(5, num_classes)
    # loss sum, top-1 hits, top-5 hits: summed on the device, read once at the end
    sums = torch.zeros(3, device=env.device)
    count = 0
    steps = len(loader) if max_batches is None else min(len(loader), max_batches)
    batches = enumerate(loader)  # DataLoader workers start before the progress clock's thread
    with _progress(steps, desc, env, lines) as bar:
        for i, (images, target) in batches:
            if i >= steps:
                break
            images = images.to(env.device, non_blocking=True)
            target = target.to(env.device, non_blocking=True)
            with precision.autocast():
                logits = _logits(model(pad_batch(images, static_batch)))[:images.shape[0]]
            logits = logits.float()
            sums += torch.cat([F.cross_entropy(logits, target, reduction="sum").view(1),
                               topk_hits(logits, target, (1, k5))])
            count += images.shape[0]
            bar.update(images.shape[0])
    loss_sum, c1, c5 = sums.tolist()
    loss_sum, c1, c5, count = all_reduce_sums([loss_sum, c1, c5, float(count)], env)
    n = max(count, 1.0)
    return {"loss": loss_sum / n, "acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n,
            "images": int(count)}


@torch.no_grad()
def predict_batches(model: torch.nn.Module, loader, precision: Precision,
                    device: torch.device, desc: str = "predict", show_progress: bool = True,
                    static_batch: Optional[int] = None,
                    lines: Optional[ProgressLines] = None) -> Iterator[tuple[torch.Tensor, tuple]]:
    """Yield ``(probabilities on the CPU, the rest of the batch)`` for each batch; the
    first element of each batch must be the image tensor. ``static_batch``: as in
    :func:`validate` (a compiled model would otherwise recompile for the last batch);
    ``lines``: as in :func:`train_one_epoch`."""
    model.eval()
    batches = iter(loader)  # DataLoader workers start before the progress clock's thread
    with EpochProgress(len(loader), desc, show=show_progress, lines=lines) as bar:
        for batch in batches:
            images, rest = batch[0].to(device, non_blocking=True), tuple(batch[1:])
            with precision.autocast():
                logits = _logits(model(pad_batch(images, static_batch)))[:images.shape[0]]
            yield logits.float().softmax(dim=1).cpu(), rest
            bar.update(images.shape[0])
