"""Training curves and confusion matrices as PNG files (matplotlib, Agg backend:
works without a display)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    """Save through a temporary file and rename, like every other output."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def plot_curves(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Loss (left) and top-1 accuracy (right) per epoch: train, val and EMA val."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    series = (("train_", "train", "-o"), ("val_", "val", "-s"), ("ema_val_", "val (EMA)", "--^"))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc1")):
        for prefix, label, style in series:
            ys = [r.get(prefix + metric) for r in history]
            if any(y is not None and y == y for y in ys):  # y == y: not NaN
                ax.plot(epochs, [np.nan if y is None else y for y in ys], style,
                        label=label, markersize=3)
    ax_loss.set(title="loss", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="top-1 accuracy", xlabel="epoch", ylabel="ACC1 (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    fig.text(0.5, -0.06, "train accuracy is measured on augmented (and mixed) batches "
             "against the original labels", ha="center", fontsize=8, color="gray")
    return _save(fig, path)


def plot_confusion_matrix(cm: Sequence[Sequence[int]], class_names: Sequence[str],
                          path: str | os.PathLike, title: str = "confusion matrix") -> Path:
    """Rows: true class, columns: predicted; colour = share of the row, text = count."""
    cm = np.asarray(cm, dtype=np.int64)
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(5.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 40:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    return _save(fig, path)
