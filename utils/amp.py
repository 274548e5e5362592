"""Mixed precision as one object that may do nothing.

``Precision(mode, device)`` resolves ``--amp {auto,bf16,fp16,off}`` once; the training
loop then always writes::

    with precision.autocast():
        loss = criterion(model(x), y)
    precision.scaler.scale(loss).backward()
    precision.scaler.unscale_(optimizer)
    precision.scaler.step(optimizer)
    precision.scaler.update()

With ``off`` or ``bf16`` the scaler is a disabled ``torch.amp.GradScaler`` whose
methods pass straight through (``scale`` returns the loss, ``step`` calls
``optimizer.step()``); with ``off`` the autocast context is disabled too. So there is
no ``if amp:`` anywhere. ``auto`` means bf16 on a CUDA GPU that supports it and off
everywhere else (CPU autocast is slower than fp32 on most CPUs). The GroupMamba model
keeps its selective scan in float32 under autocast by itself.
"""

from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("auto", "bf16", "fp16", "off")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(mode: str, device: torch.device) -> str:
    if mode not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, not {mode!r}")
    if mode == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "off"
    return mode


class Precision:
    """Autocast context and gradient scaler for one ``--amp`` mode on one device."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = resolve_amp(mode, device)
        self.device_type = device.type
        self.dtype = _DTYPES.get(self.mode, torch.float32)
        self.enabled = self.mode != "off"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.mode == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype,
                              enabled=self.enabled)

    def __repr__(self) -> str:
        return f"Precision({self.mode}, scaler={'on' if self.scaler.is_enabled() else 'off'})"
