"""Running averages, top-k accuracy and the per-class report.

Accuracies are in percent (0-100) in logs, metrics.csv and checkpoints; the
scikit-learn report keeps its own fractions (0-1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.images import atomic_write_json, atomic_write_text


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


def classification_report_files(y_true: Sequence[int], y_pred: Sequence[int],
                                class_names: Sequence[str], out_txt: str | os.PathLike,
                                out_json: str | os.PathLike, header: str = "") -> dict:
    """Write scikit-learn's per-class report as text and JSON; return it as a dict
    (with ``confusion_matrix`` rows = true class, columns = predicted class)."""
    from sklearn.metrics import classification_report, confusion_matrix

    labels = list(range(len(class_names)))
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    text = classification_report(y_true, y_pred, labels=labels,
                                 target_names=list(class_names), digits=4,
                                 zero_division=0)
    report = classification_report(y_true, y_pred, labels=labels,
                                   target_names=list(class_names), output_dict=True,
                                   zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    acc = float((y_true == y_pred).mean()) if len(y_true) else float("nan")
    summary = {"num_samples": int(len(y_true)), "accuracy": acc,
               "class_names": list(class_names), "report": report,
               "confusion_matrix": cm.tolist()}
    atomic_write_text(out_txt, (header + "\n\n" if header else "") + text
                      + f"\nsamples: {len(y_true)}   accuracy: {acc:.4f}\n")
    atomic_write_json(out_json, summary)
    return summary


def write_csv(path: str | os.PathLike, fieldnames: Sequence[str], rows) -> Path:
    """Write rows (dicts) as CSV atomically; floats with 6 significant digits."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                         for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())

