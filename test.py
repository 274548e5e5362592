"""Predict the classes of images with a checkpoint written by train.py.

    python test.py --checkpoint runs/<time>/best.pth --images data/val
    python test.py --checkpoint best.pth --images photo.jpg
    python test.py --checkpoint best.pth --images "new/**/*.png" --output new.csv

Everything about the model comes from the checkpoint: the timm model name and its
arguments, the class names, the mean/std and the image size. --images is one image, a
folder (searched recursively) or a glob pattern (quote it; ``**`` allowed).

Writes --output (default predictions.csv), one row per image::

    file, [label, correct,] predicted, confidence, class_1, prob_1, ..., class_5, prob_5, error

(top-k with k = min(--topk, number of classes); ``error`` names the problem for an
image that cannot be read: such images are listed, not fatal, and have no prediction).
For a single image the top-k classes are printed as well.

When --images is a folder laid out as ``<folder>/<class name>/...`` with the
checkpoint's class names (e.g. data/val), the true label is known: ACC1/ACC5 are
printed and, beside the CSV, ``<name>_report.txt``/``<name>_report.json`` (per-class
precision, recall, F1; scikit-learn) and ``<name>_confusion_matrix.png`` are written,
where ``<name>`` is the CSV's name without ``.csv``.

Existing output files (the CSV, and the report files when the folder is labelled) are
not overwritten unless --force is given.

Weights: by default the ones that scored best during training (best.pth records
whether the raw or the EMA weights won, and keeps only those); --ema forces the EMA
weights, --weights model the raw ones (last.pth holds both). Exit codes: 0 done, 1 no image could be read, 2 bad arguments or
checkpoint, or another failure said in one line (out of memory, a full disk, a
read-only folder, a scan backend that cannot run here).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kernels.grid_scan import SCAN_BACKENDS
from models import Classifier, ModelConfigError, is_groupmamba
from utils.accel import resolve_scan_backend
from utils.amp import AMP_MODES
from utils.checkpoint import INFERENCE_KEYS, CheckpointError, check_checkpoint, load_checkpoint
from utils.config import SCAN_BACKEND_ENV, choose_scan_backend
from utils.datasets import DatasetError, PredictDataset
from utils.distributed import resolve_device
from utils.errors import UsageError, exit_if_known
from utils.images import check_writable, collect_images, labels_from_folder
from utils.predictions import prediction_row, ranked, top_k_lines, write_predictions
from utils.report import write_classification_report

log = logging.getLogger("test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict image classes with a train.py checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                   help="best.pth or last.pth from train.py")
    g.add_argument("--images", required=True, default=argparse.SUPPRESS,
                   help="an image, a folder (recursive) or a glob pattern")
    g.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                   help="auto: the weights that were best in training (raw or EMA)")
    g.add_argument("--ema", dest="weights", action="store_const", const="ema",
                   default=argparse.SUPPRESS, help="same as --weights ema")
    g = p.add_argument_group("output")
    g.add_argument("--output", default="predictions.csv", help="CSV file to write")
    g.add_argument("--force", action="store_true", help="overwrite existing output files")
    g.add_argument("--topk", type=int, default=5, help="classes listed per image")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding processes")
    g.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="auto: bf16 on a GPU that supports it, else off")
    g.add_argument("--scan-backend", choices=SCAN_BACKENDS, default=None,
                   help="the selective scan, as in train.py (unset: "
                        f"${SCAN_BACKEND_ENV}, else auto)")
    return p


def side_files(csv_path: Path) -> dict[str, Path]:
    stem = csv_path.name[:-4] if csv_path.name.lower().endswith(".csv") else csv_path.name
    return {"txt": csv_path.with_name(stem + "_report.txt"),
            "json": csv_path.with_name(stem + "_report.json"),
            "png": csv_path.with_name(stem + "_confusion_matrix.png")}


def load_classifier(args, ckpt: dict, device: torch.device) -> Classifier:
    """The checkpoint's model with the chosen weights and preprocessing, in eval mode on ``device``."""
    return Classifier.from_checkpoint(ckpt, device, args.weights, args.scan_backend, args.amp,
                                      source=args.checkpoint)


def prediction_rows(clf: Classifier, loader, dataset, labels, k: int):
    """``(CSV rows, true classes, predicted classes, top-k hits, unreadable files)``."""
    rows, y_true, y_pred, top_k_hits, bad = [], [], [], 0, []
    for images, indices, errors in tqdm(loader, desc="predict", leave=False, dynamic_ncols=True, disable=None):
        for p, i, err in zip(clf.probabilities(images).numpy(), indices.tolist(), errors):
            if err:
                row = {"file": dataset.files[i], "error": err}
                bad.append((dataset.files[i], err))
            else:
                top = ranked(p, k)
                row = prediction_row(dataset.files[i], p, clf.class_names, top)
            if labels is not None:
                row["label"] = clf.class_names[labels[i]]
            rows.append(row)
            if labels is not None and not err:
                row["correct"] = int(top[0] == labels[i])
                y_true.append(labels[i])
                y_pred.append(top[0])
                top_k_hits += int(labels[i] in top)
    return rows, y_true, y_pred, top_k_hits, bad


def report_unreadable(bad: list, out: Path) -> None:
    log.warning("%d image(s) could not be read (rows with an 'error' in %s):", len(bad), out)
    for path, err in bad[:20]:
        log.warning("  %s", err or path)
    if len(bad) > 20:
        log.warning("  ... and %d more", len(bad) - 20)


def check_outputs(args, labelled: bool) -> tuple[Path, dict[str, Path]]:
    """The CSV and, for a labelled folder, the report files beside it: checked before any
    prediction (not a folder, writable, not overwritten without --force)."""
    out = Path(args.output)
    extra = side_files(out) if labelled else {}
    if out.is_dir():
        raise UsageError(f"--output {out} is a folder; give a CSV file name, e.g. {out / 'predictions.csv'}")
    folders = [str(p) for p in extra.values() if p.is_dir()]
    if folders:
        raise UsageError(f"{folders[0]} (a report file beside --output) is a folder; choose another --output")
    existing = [str(p) for p in [out, *extra.values()] if p.exists()]
    if existing and not args.force:
        raise UsageError(f"{', '.join(existing)} already exist(s); pass --force to "
                         "overwrite or choose another --output")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True)
    for leftover in check_writable(out):
        log.warning("warning: %s is a temporary file an interrupted write of %s left behind; delete it "
                    "unless another test.py is writing that file now", leftover, out)
    return out, extra


def prepare(args):
    """Everything checked before predicting: ``(checkpoint, files, folder, labels, device, out, extra)``."""
    if args.batch_size < 1 or args.topk < 1 or args.workers < 0:
        raise UsageError("--batch-size and --topk must be >= 1, --workers >= 0")
    ckpt = load_checkpoint(args.checkpoint, INFERENCE_KEYS, "prediction")
    check_checkpoint(ckpt, args.checkpoint)
    files, folder = collect_images(args.images)
    labels = labels_from_folder(files, folder, ckpt["class_names"])
    out, extra = check_outputs(args, labels is not None)
    device = resolve_device(args.device)
    if is_groupmamba(ckpt["model_name"]):  # a scan that cannot run here is said now, not at the first batch
        resolve_scan_backend(choose_scan_backend(args.scan_backend), device)
    return ckpt, files, folder, labels, device, out, extra


def write_report(args, ckpt, which: str, folder, names, y_true, y_pred, top_k_hits: int, k: int, extra) -> None:
    acc1 = 100.0 * sum(int(a == b) for a, b in zip(y_true, y_pred)) / len(y_true)
    acck = 100.0 * top_k_hits / len(y_true)
    header = (f"{args.checkpoint} ({ckpt['model_name']}, {which} weights) on "
              f"{len(y_true)} images of {folder}: ACC1 {acc1:.2f} %, ACC{k} {acck:.2f} %")
    write_classification_report(y_true, y_pred, names, extra, header, str(folder))
    log.info("ACC1 %.2f %%  ACC%d %.2f %%  (%d images); report: %s, %s", acc1, k, acck,
             len(y_true), extra["txt"], extra["png"])


def run(args) -> int:
    ckpt, files, folder, labels, device, out, extra = prepare(args)
    clf = load_classifier(args, ckpt, device)
    names, img_size = clf.class_names, clf.img_size
    log.info("%s: %s (%s weights, %d classes, %d px) on %s; %d image(s)%s",
             args.checkpoint, clf.model_name, clf.weights, len(names), img_size, device,
             len(files), f", labelled by folder ({folder})" if labels else "")

    dataset = PredictDataset(files, clf.transform, img_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    k = min(args.topk, len(names))
    rows, y_true, y_pred, top_k_hits, bad = prediction_rows(clf, loader, dataset, labels, k)
    write_predictions(out, rows, k, labels is not None)
    log.info("wrote %d predictions to %s", len(rows) - len(bad), out)
    if len(rows) == 1 and not bad:
        log.info("%s:\n%s", rows[0]["file"], "\n".join(top_k_lines(rows[0], k)))
    if bad:
        report_unreadable(bad, out)
    if labels is not None and y_true:
        write_report(args, ckpt, clf.weights, folder, names, y_true, y_pred, top_k_hits, k, extra)
    elif folder is not None and labels is None:
        log.info("(no accuracy: %s is not laid out as <folder>/<class name>/... with the "
                 "checkpoint's class names)", folder)
    return 1 if len(bad) == len(rows) else 0


def main(argv=None) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    args = build_parser().parse_args(argv)
    try:
        code = run(args)
    except SystemExit as exc:  # e.g. --device cuda without a GPU
        if not isinstance(exc.code, str):
            raise
        print(exc.code, file=sys.stderr)
        code = 2
    except Exception as exc:
        exit_if_known(exc, code=2, known=(CheckpointError, DatasetError, ModelConfigError, UsageError),
                      memory_hint=f"the run used --batch-size {args.batch_size}; lower --batch-size")
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
