"""train.py's ``--tensorboard``: the per-epoch metrics as TensorBoard scalars.

Written with ``torch.utils.tensorboard`` into ``<run folder>/tensorboard/`` (step = epoch);
``tensorboard --logdir runs`` shows every run. The tensorboard package is optional:
:func:`tensorboard_missing` says so before a run starts.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Mapping, Optional

FOLDER = "tensorboard"
# TensorBoard tag -> metrics.csv column; a tag's prefix groups its charts
SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "loss/val_ema": "ema_val_loss",
           "acc1/train": "train_acc1", "acc1/val": "val_acc1", "acc1/val_ema": "ema_val_acc1",
           "acc5/train": "train_acc5", "acc5/val": "val_acc5", "acc5/val_ema": "ema_val_acc5",
           "lr": "lr"}


def tensorboard_missing() -> Optional[str]:
    """None when TensorBoard files can be written here, else the one-line reason."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return "--tensorboard needs the tensorboard package: pip install tensorboard"
    return None


class TensorBoardLog:
    """Per-epoch scalars into ``<folder>/tensorboard``; does nothing when not ``enabled``.
    The file is closed by :meth:`close` or, at the latest, when the log is dropped."""

    def __init__(self, folder: str | os.PathLike, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(folder) / FOLDER))
            self._finalizer = weakref.finalize(self, self.writer.close)

    def add(self, row: Mapping) -> None:
        """One metrics.csv row (an epoch); NaN and missing values (no EMA) are left out."""
        if self.writer is None:
            return
        for tag, column in SCALARS.items():
            value = row.get(column)
            if value is not None and value == value:
                self.writer.add_scalar(tag, float(value), int(row["epoch"]))
        self.writer.flush()  # readable while the run goes on, and kept if it is killed

    def close(self) -> None:
        if self.writer is not None:
            self._finalizer()  # closes the writer, once
            self.writer = None
