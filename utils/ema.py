"""Exponential moving average of the weights: timm's ModelEmaV3 with its per-step
host work cut down.

ModelEmaV3 rebuilds the state dicts of both models at every update to pair their
tensors; GroupMamba has ~1,300 state-dict entries (per-group SS2D parameters), which
costs ~10 ms of host time a step on a fast CPU, more than an H200 needs for a
160 px, batch-64 training step (~34 ms of GPU time with everything else the loop
does on the host). Here the pairs are looked up once per model; the decay schedule,
the copy and everything else stay timm's.
"""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3

__all__ = ["ModelEma"]


class ModelEma(ModelEmaV3):
    """ModelEmaV3 (same arguments) whose update pairs the tensors of the two models
    once: the model must keep its parameter and buffer tensors (in-place updates and
    ``load_state_dict`` do; replacing a module's tensors needs a new ModelEma)."""

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self._pairs_for: int | None = None
        self._pairs: tuple[list, list, list, list] = ([], [], [], [])
        self._low_precision = False  # a bf16/fp16 EMA tensor: timm's stochastic rounding

    def _tensor_pairs(self, model: torch.nn.Module) -> tuple[list, list, list, list]:
        if self._pairs_for != id(model):
            ema_state, model_state = self.module.state_dict(), model.state_dict()
            if list(ema_state) != list(model_state):
                raise ValueError("the EMA and the model have different state-dict keys")
            floats = [k for k, v in ema_state.items() if v.is_floating_point()]
            others = [k for k, v in ema_state.items() if not v.is_floating_point()]
            self._pairs = ([ema_state[k] for k in floats], [model_state[k] for k in floats],
                           [ema_state[k] for k in others], [model_state[k] for k in others])
            self._low_precision = any(ema_state[k].dtype in (torch.float16, torch.bfloat16)
                                      for k in floats)
            self._pairs_for = id(model)
        return self._pairs

    def apply_update_(self, model: torch.nn.Module, decay: float) -> None:
        ema_floats, model_floats, ema_others, model_others = self._tensor_pairs(model)
        if self.device is not None or not self.foreach or self._low_precision:
            # another device, no foreach, or stochastic rounding: timm's own update
            return super().apply_update_(model, decay)
        if ema_floats:
            torch._foreach_lerp_(ema_floats, model_floats, 1.0 - decay)
        if ema_others:
            torch._foreach_copy_(ema_others, model_others)
