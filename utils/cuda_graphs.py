"""Whole-step CUDA-graph capture for launch-bound models.

GroupMamba issues thousands of small kernels per training step (more with compiled
regions, whose Triton launches cost more CPU time each); on a fast GPU the CPU
cannot launch them as fast as the GPU runs them. Captured once in a CUDA graph, a
step is replayed with one launch: the same kernels on the same buffers, so the
numerics are those of the uncaptured step. The price is static shapes and
addresses: inputs are copied into fixed buffers before each replay and outputs are
read from fixed ones (valid until the next replay).

- :func:`capture`: a callable captured after warm-up calls (used by the benchmark);
- :class:`CapturedTrainStep`: forward, loss, backward, gradient clipping and the
  optimizer step of ``train.py`` in one graph (``--cuda-graph``; whether it can run
  is decided in :mod:`utils.accel`);
- :class:`CapturedForward`: an evaluation forward in one graph.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["capture", "CapturedTrainStep", "CapturedForward"]


def capture(warmup_step: Callable[[], object], body: Callable[[], object],
            before_capture: Callable[[], object] = lambda: None, warmup: int = 3) -> Callable[[], None]:
    """``body`` captured in a CUDA graph; returns the graph's replay.

    ``warmup_step`` runs ``warmup`` times first on a side stream, as the CUDA-graph
    docs prescribe: it triggers lazy initialisation (cuBLAS workspaces, Triton and
    inductor kernels, cached index tensors, optimizer state) that must not happen
    during capture. ``before_capture`` runs last, outside the graph (e.g. freeing
    gradients so that the captured backward allocates them from the graph's pool).
    """
    on_side_stream(warmup_step, warmup)
    before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def on_side_stream(fn: Callable[[], object], times: int = 1):
    """Call ``fn`` ``times`` times on a side stream, ordered after and before the
    current stream's work; returns the last result."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    result = None
    with torch.cuda.stream(side):
        for _ in range(times):
            result = fn()
    torch.cuda.current_stream().wait_stream(side)
    return result


def _detached(outputs):
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(t.detach() for t in outputs)
    return outputs.detach()


def _graph_autocast(device_type: str, dtype: torch.dtype, enabled: bool):
    # no autocast weight cache under capture: cached casts would outlive the graph's pool
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


class CapturedTrainStep:
    """One training step replayed from a CUDA graph.

    The first ``warmup`` calls run uncaptured (on a side stream): they compile, fill
    the optimizer state and train like any step. The next call captures the step and
    replays it; every later call copies its batch into the captured input buffers and
    replays. ``loss_fn(outputs, target)`` computes the loss; ``max_norm`` clips the
    gradient norm (``inf``: measured only). The optimizer must have been built with
    ``capturable=True``; its learning rates are mirrored into device tensors before
    each replay, so a scheduler that sets ``param_group["lr"]`` keeps working.

    Returns ``(outputs, loss, grad_norm)`` (device tensors, detached; the captured ones
    are overwritten by the next call). A NaN loss is seen only after the optimizer step.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 autocast_dtype: torch.dtype, autocast_enabled: bool, max_norm: float,
                 warmup: int = 3):
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("CapturedTrainStep needs an optimizer built with capturable=True")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = lambda: _graph_autocast("cuda", autocast_dtype, autocast_enabled)
        self.max_norm, self.warmup = max_norm, warmup
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] = ()
        self.result: tuple = ()
        self.lrs: list[torch.Tensor] = []

    def _forward_backward_step(self, images: torch.Tensor, target: torch.Tensor):
        with self.autocast():
            outputs = self.model(images)
            loss = self.loss_fn(outputs, target)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        # detached: outputs that keep an uncaptured step's autograd graph alive keep its
        # gradient-accumulation nodes, made on the warm-up stream, for the captured
        # backward too, which then accumulates those gradients off the capture stream
        # (torch warns "AccumulateGrad node's stream does not match"), and a training run
        # diverged with gradient norms of 1e6 (bench/RESULTS.md, 2026-12-07 09:15 UTC)
        return _detached(outputs), loss.detach(), grad_norm

    def _uncaptured(self, images, target):
        self.optimizer.zero_grad(set_to_none=True)
        return self._forward_backward_step(images, target)

    def _capture(self, images: torch.Tensor, target: torch.Tensor) -> None:
        self.inputs = (images.clone(), target.clone())
        groups = self.optimizer.param_groups
        self.lrs = [torch.tensor(float(g["lr"]), device=images.device) for g in groups]
        floats = [g["lr"] for g in groups]
        # gradients allocated by the captured backward, from the graph's memory pool
        self.optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(groups, self.lrs):
            group["lr"] = lr  # the captured optimizer reads the rate from this tensor
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.result = self._forward_backward_step(*self.inputs)
        except RuntimeError as exc:
            raise RuntimeError(f"capturing the training step in a CUDA graph failed ({exc}); "
                               "train without --cuda-graph") from exc
        finally:
            for group, lr in zip(groups, floats):
                group["lr"] = lr
        self.graph = graph

    def __call__(self, images: torch.Tensor, target: torch.Tensor):
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return on_side_stream(lambda: self._uncaptured(images, target))
        if self.graph is None:
            self._capture(images, target)
        if images.shape != self.inputs[0].shape or target.shape != self.inputs[1].shape:
            raise ValueError(f"a captured training step takes batches of {tuple(self.inputs[0].shape)}, "
                             f"got {tuple(images.shape)} (training batches must all have one size)")
        self.inputs[0].copy_(images)
        self.inputs[1].copy_(target)
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            lr.fill_(float(group["lr"]))
        self.graph.replay()
        return self.result


class CapturedForward:
    """An evaluation forward replayed from a CUDA graph (batches of one size).

    Call it like the module, inside ``torch.no_grad()``. The first ``warmup`` calls
    run uncaptured; then the forward is captured for that batch shape. A batch of
    another shape runs uncaptured. ``eval()`` switches the module to eval mode (as
    ``validate`` expects of a model); the output is overwritten by the next call.
    """

    def __init__(self, module: torch.nn.Module, autocast_dtype: torch.dtype, autocast_enabled: bool,
                 warmup: int = 2):
        self.module, self.warmup = module, warmup
        self.autocast = lambda: _graph_autocast("cuda", autocast_dtype, autocast_enabled)
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.input: Optional[torch.Tensor] = None
        self.output = None

    def eval(self) -> "CapturedForward":
        self.module.eval()
        return self

    def _forward(self, images: torch.Tensor):
        with self.autocast():
            return self.module(images)

    def __call__(self, images: torch.Tensor):
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return on_side_stream(lambda: self._forward(images))
        if self.graph is None:
            self.input = images.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self._forward(self.input)
        if images.shape != self.input.shape:
            return self._forward(images)
        self.input.copy_(images)
        self.graph.replay()
        return self.output
