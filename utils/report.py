"""What a run leaves for people to read: the per-class report, the confusion matrix,
the training curves and CSV tables. train.py (its final report on val) and test.py
(predictions on a labelled folder) both write their reports through
:func:`write_classification_report`.

Files are written atomically (a temporary file, then a rename). Plots use
matplotlib's Agg backend, so they work without a display.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.errors import reraise_with_path  # noqa: E402
from utils.images import atomic_write_json, atomic_write_text  # noqa: E402
from utils.tensorboard_log import TensorBoardLog  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    """Save through a temporary file and rename, like every other output."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException as exc:
        reraise_with_path(exc, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def plot_curves(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Loss (left) and top-1 accuracy (middle) per epoch: train, val and EMA val; the
    learning rate at the end of each epoch (right)."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(16, 4))
    series = (("train_", "train", "-o"), ("val_", "val", "-s"), ("ema_val_", "val (EMA)", "--^"))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc1")):
        for prefix, label, style in series:
            ys = [r.get(prefix + metric) for r in history]
            if any(y is not None and y == y for y in ys):  # y == y: not NaN
                ax.plot(epochs, [np.nan if y is None else y for y in ys], style,
                        label=label, markersize=3)
        ax.legend()
    lrs = [r.get("lr") for r in history]
    ax_lr.plot(epochs, [np.nan if y is None else y for y in lrs], "-o", markersize=3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_loss.set(title="loss", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="top-1 accuracy", xlabel="epoch", ylabel="ACC1 (%)")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    fig.text(0.5, -0.06, "train accuracy is measured on augmented (and mixed) batches "
             "against the original labels", ha="center", fontsize=8, color="gray")
    return _save(fig, path)


def plot_confusion_matrix(cm: Sequence[Sequence[int]], class_names: Sequence[str],
                          path: str | os.PathLike, title: str = "confusion matrix") -> Path:
    """scikit-learn's ConfusionMatrixDisplay. Rows: true class, columns: predicted; colour =
    share of the row, text = count (none for empty cells, none at all beyond 40 classes)."""
    from sklearn.metrics import ConfusionMatrixDisplay  # imported when needed: slow

    cm = np.asarray(cm, dtype=np.int64)
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(5.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    display = ConfusionMatrixDisplay(share, display_labels=list(class_names))
    display.plot(ax=ax, cmap="Blues", colorbar=False, include_values=n <= 40, xticks_rotation=45,
                 im_kw={"vmin": 0, "vmax": 1})
    fig.colorbar(display.im_, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    plt.setp(ax.get_xticklabels(), ha="right")
    for (i, j), text in np.ndenumerate(display.text_ if display.text_ is not None else np.empty((0, 0))):
        # counts written on the shares' colours
        text.set(text=str(cm[i, j]) if cm[i, j] else "", fontsize=8,
                 color="white" if share[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def classification_report_files(y_true: Sequence[int], y_pred: Sequence[int],
                                class_names: Sequence[str], out_txt: str | os.PathLike,
                                out_json: str | os.PathLike, header: str = "") -> dict:
    """Write scikit-learn's per-class report as text and JSON; return it as a dict
    (with ``confusion_matrix`` rows = true class, columns = predicted class)."""
    from sklearn.metrics import classification_report, confusion_matrix  # imported when needed: slow

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


class EpochLog:
    """The per-epoch record of a run: ``metrics.csv`` (all rows so far, rewritten
    atomically) and, with ``tensorboard``, each new row's scalars for TensorBoard."""

    def __init__(self, folder: str | os.PathLike, fields: Sequence[str], tensorboard: bool = False):
        self.path, self.fields = Path(folder) / "metrics.csv", tuple(fields)
        self.tensorboard = TensorBoardLog(folder, tensorboard)

    def write(self, history: Sequence[Mapping]) -> None:
        write_csv(self.path, self.fields, history)
        self.tensorboard.add(history[-1])


def write_csv(path: str | os.PathLike, fieldnames: Sequence[str], rows) -> Path:
    """Write rows (dicts) as CSV atomically; floats with 6 significant digits."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                         for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())


def write_classification_report(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str],
                                paths: Mapping[str, str | os.PathLike], header: str, title: str) -> dict:
    """The per-class report (``paths["txt"]``, ``paths["json"]``) and the confusion
    matrix (``paths["png"]``, titled ``title`` plus the accuracy); returns the summary."""
    summary = classification_report_files(y_true, y_pred, class_names, paths["txt"], paths["json"], header)
    plot_confusion_matrix(summary["confusion_matrix"], class_names, paths["png"],
                          title=f"{title}, ACC1 {100 * summary['accuracy']:.2f} %")
    return summary
