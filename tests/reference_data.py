"""The official reference outputs in ../shared/reference, and running our model on them.

The folder can be moved with GROUPMAMBA_REFERENCE_DIR (e.g. on a GPU machine where
../shared is not mounted).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn as nn

from models import GroupMamba

REFERENCE_DIR = Path(os.environ.get("GROUPMAMBA_REFERENCE_DIR")
                     or Path(__file__).resolve().parents[1].parent / "shared" / "reference")
SHAPES_FILE = REFERENCE_DIR / "official_state_dict_shapes.json"
NUMERICS_FILE = REFERENCE_DIR / "official_small_config_reference.pt"
TOLERANCE = 1e-4  # relative L2 error, float32


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).norm() / expected.norm()).item()


def run_reference(reference: dict, device: str = "cpu", scan_backend: str = "auto",
                  fused_kernels: bool = False) -> dict:
    """Our model with the reference weights: eval logits, both train heads, every gradient."""
    model = GroupMamba(**reference["config"], scan_backend=scan_backend, fused_kernels=fused_kernels,
                       norm_layer=functools.partial(nn.LayerNorm, eps=reference["norm_eps"]))
    model.load_state_dict(reference["state_dict"], strict=True)
    model.to(device)
    images = reference["input"].to(device)
    model.eval()
    with torch.no_grad():
        eval_logits = model(images)
    model.train()
    head, dist_head = model(images)
    (head.sum() + dist_head.sum()).backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    return dict(eval_logits=eval_logits, train_head=head.detach(), train_dist_head=dist_head.detach(), grads=grads)


def gradient_mismatches(ours: dict, expected: dict, tolerance: float = TOLERANCE) -> list[str]:
    """One line per parameter whose gradient is off (exact zeros must stay ~zero)."""
    failures = []
    if sorted(ours) != sorted(expected):
        failures.append(f"parameter names differ: {sorted(set(ours) ^ set(expected))}")
    for name, grad in expected.items():
        mine = ours.get(name)
        if mine is None:
            failures.append(f"{name}: no gradient")
        elif grad.norm() == 0:
            if mine.abs().max() > 1e-6:
                failures.append(f"{name}: expected zero, max |grad| {mine.abs().max():.3g}")
        elif rel_error(mine, grad) >= tolerance:
            failures.append(f"{name}: relative error {rel_error(mine, grad):.3g}")
    return failures
