"""Running averages and top-k accuracy.

Accuracies are in percent (0-100) in logs, metrics.csv and checkpoints; the
scikit-learn report (utils/report.py) keeps its own fractions (0-1).
"""

from __future__ import annotations

from typing import Sequence

import torch


class AverageMeter:
    """Weighted running average (``update(value, n)`` adds n samples of ``value``)."""

    def __init__(self, name: str = ""):
        self.name = name
        self.sum = 0.0
        self.count = 0.0
        self.val = 0.0

    def update(self, value: float, n: int = 1) -> None:
        self.val = float(value)
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else float("nan")


def topk_hits(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Number of samples whose target is among the top k logits, for each k, as a float
    tensor on the logits' device (no host sync).

    Each k is clamped to the class count, so "top-5" of a 3-class problem is top-3.
    """
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices            # (B, maxk)
    hit = pred.eq(target.view(-1, 1))                  # (B, maxk)
    return torch.stack([hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]).float()
