"""GroupMamba models. Importing this package registers the variants with timm.

    import models, timm
    model = timm.create_model("groupmamba_tiny", num_classes=12)
    model = timm.create_model("groupmamba_tiny", pretrained=True, num_classes=12,
                              pretrained_cfg_overlay=dict(file="groupmamba_tiny.pth"))
    backbone = timm.create_model("groupmamba_tiny", features_only=True)  # four stage maps
    model = models.create_model("groupmamba_tiny", num_classes=12, checkpoint_path="release.pth")
    clf = models.Classifier.from_checkpoint("runs/mine/best.pth"); clf.predict("photo.jpg")
"""
from __future__ import annotations

import os
from typing import Optional, Union

import timm
import torch.nn as nn

from ._helpers import (CheckpointError, LoadInfo, apply_pretrained_cfg, checkpoint_cfg, load_pretrained,
                       preprocessing_cfg, read_checkpoint)
from .classifier import Classifier
from .csms6s import SCAN_DIRECTIONS, from_sequence, selective_scan, to_sequence
from .groupmamba import GroupMamba, GroupMambaLayer, PretrainedWeightsError, checkpoint_filter_fn, groupmamba_base, \
    groupmamba_small, groupmamba_tiny
from .ss2d import SS2D

__all__ = [
    "Classifier", "GroupMamba", "GroupMambaLayer", "SS2D", "LoadInfo", "SCAN_DIRECTIONS", "CheckpointError", "ModelConfigError",
    "PretrainedWeightsError", "apply_pretrained_cfg", "checkpoint_cfg", "preprocessing_cfg",
    "checkpoint_filter_fn", "load_pretrained", "read_checkpoint", "create_model", "list_models", "is_groupmamba",
    "check_model_name", "groupmamba_tiny", "groupmamba_small", "groupmamba_base",
    "to_sequence", "from_sequence", "selective_scan",
]


class ModelConfigError(ValueError):
    """An unknown model name or arguments the model does not take."""


def list_models() -> list[str]:
    """Names of the registered GroupMamba variants."""
    return timm.list_models("groupmamba_*")


def is_groupmamba(name: str) -> bool:
    return name.lower().startswith("groupmamba")


def check_model_name(name: str) -> None:
    """Raise ModelConfigError unless timm knows ``name``."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        raise ModelConfigError(f"unknown model {name!r}"
                               + (f"; similar names: {', '.join(close)}" if close else
                                  " (any timm model name, or groupmamba_tiny/small/base)"))


def create_model(model_name: str, pretrained: bool = False,
                 checkpoint_path: Optional[Union[str, os.PathLike]] = None, strict: bool = True, *,
                 scan_backend: Optional[str] = None, fused_kernels: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` for any timm name, the GroupMamba variants registered.

    ``scan_backend`` and ``fused_kernels`` are GroupMamba's (see :class:`GroupMamba`); other
    models ignore them. ``checkpoint_path`` goes through :func:`load_pretrained` (an
    official release, a bare state dict or a checkpoint of ours; heads of another class
    count re-initialised); a checkpoint of ours also sets ``model.pretrained_cfg`` to the
    preprocessing it was trained with. Unknown names and arguments raise :class:`ModelConfigError`.
    """
    check_model_name(model_name)
    if is_groupmamba(model_name):
        kwargs.update(fused_kernels=fused_kernels, **({"scan_backend": scan_backend} if scan_backend else {}))
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ModelConfigError(f"model {model_name!r} does not accept {sorted(kwargs)}: {exc}") from exc
    if checkpoint_path is not None:
        cfg = checkpoint_cfg(load_pretrained(model, checkpoint_path, strict=strict).metadata)
        if cfg:
            apply_pretrained_cfg(model, cfg)
    return model
