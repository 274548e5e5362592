"""GroupMamba models. Importing this package registers the variants with timm.

    import models, timm
    model = timm.create_model("groupmamba_tiny", num_classes=12)
    model = models.create_model("groupmamba_tiny", num_classes=12, checkpoint_path="release.pth")
"""
from __future__ import annotations

import os
from typing import Optional, Union

import timm
import torch.nn as nn

from .csms6s import SCAN_DIRECTIONS, from_sequence, selective_scan, to_sequence
from .groupmamba import (GroupMamba, GroupMambaLayer, LoadInfo, checkpoint_filter_fn, groupmamba_base,
                         groupmamba_small, groupmamba_tiny, load_pretrained)
from .ss2d import SS2D

__all__ = [
    "GroupMamba", "GroupMambaLayer", "SS2D", "LoadInfo", "SCAN_DIRECTIONS",
    "checkpoint_filter_fn", "load_pretrained", "create_model", "list_models",
    "groupmamba_tiny", "groupmamba_small", "groupmamba_base",
    "to_sequence", "from_sequence", "selective_scan",
]


def list_models() -> list[str]:
    """Names of the registered GroupMamba variants."""
    return timm.list_models("groupmamba_*")


def create_model(model_name: str, pretrained: bool = False,
                 checkpoint_path: Optional[Union[str, os.PathLike]] = None, strict: bool = True,
                 **kwargs) -> nn.Module:
    """``timm.create_model`` with the GroupMamba variants registered.

    ``checkpoint_path`` goes through :func:`load_pretrained` (official release,
    bare state dict or our training checkpoint; heads re-initialised on a class
    count change) instead of timm's plain loader.
    """
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        load_pretrained(model, checkpoint_path, strict=strict)
    return model
