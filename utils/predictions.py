"""The prediction CSV of test.py and predict_onnx.py: one row per image,

    file, [label, correct,] predicted, confidence, class_1, prob_1, ..., class_k, prob_k, error

probabilities with 6 decimals; an image that could not be read has only ``file`` and
``error``. Needs only numpy (no torch), like predict_onnx.py.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.images import atomic_write_text

__all__ = ["prediction_fields", "prediction_row", "ranked", "top_k_lines", "write_predictions"]


def ranked(probabilities: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` most probable classes, best first (ties: the lower index)."""
    order = np.argsort(-np.asarray(probabilities, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:k]]


def prediction_row(file: str, probabilities: Sequence[float], class_names: Sequence[str],
                   top: Sequence[int]) -> dict:
    """The CSV row of one image whose ``top`` classes are ranked already."""
    row = {"file": file, "predicted": class_names[top[0]], "confidence": f"{float(probabilities[top[0]]):.6f}"}
    for rank, index in enumerate(top, start=1):
        row[f"class_{rank}"] = class_names[index]
        row[f"prob_{rank}"] = f"{float(probabilities[index]):.6f}"
    row["error"] = ""
    return row


def prediction_fields(k: int, labelled: bool) -> list[str]:
    return (["file"] + (["label", "correct"] if labelled else []) + ["predicted", "confidence"]
            + [f for rank in range(1, k + 1) for f in (f"class_{rank}", f"prob_{rank}")] + ["error"])


def write_predictions(path: str | os.PathLike, rows: Sequence[dict], k: int, labelled: bool) -> Path:
    """The rows as CSV, written atomically (missing fields left empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=prediction_fields(k, labelled), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def top_k_lines(row: dict, k: int) -> list[str]:
    """``"  <probability>  <class>"`` per ranked class of a row, for printing."""
    return [f"  {row[f'prob_{rank}']}  {row[f'class_{rank}']}" for rank in range(1, k + 1)
            if row.get(f"class_{rank}")]
