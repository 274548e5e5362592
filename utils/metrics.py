"""Running averages and top-k accuracy, from timm.utils.

Accuracies are in percent (0-100) in logs, metrics.csv and checkpoints; the
scikit-learn report (utils/report.py) keeps its own fractions (0-1).
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.utils import AverageMeter, accuracy

__all__ = ["AverageMeter", "topk_hits"]


def topk_hits(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Number of samples whose target is among the top k logits, for each k, as a float
    tensor on the logits' device (no host sync).

    Each k is clamped to the class count, so "top-5" of a 3-class problem is top-3.
    """
    # timm's accuracy is a percentage of the batch; rounded back to whole counts
    percent = torch.stack(accuracy(logits, target, topk=tuple(ks)))
    return (percent * target.shape[0] / 100.0).round()
