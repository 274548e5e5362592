"""Predict image classes with an ONNX model written by export.py, without PyTorch.

    python predict_onnx.py --model best.onnx --images photo.jpg
    python predict_onnx.py --model best.onnx --images data/val --output val_onnx.csv

Needs numpy, Pillow and onnxruntime only. The class names, image size and mean/std come
from the model's metadata (export.py writes them into the file and beside it as
``<model>.json``). Images are prepared as test.py prepares them: decoded to RGB, resized
to img_size x img_size (bilinear, antialiased: what torchvision does with PIL images),
scaled to 0..1 and normalised with the mean/std.

--images and the CSV are test.py's: one row per image, ::

    file, [label, correct,] predicted, confidence, class_1, prob_1, ..., class_k, prob_k, error

(``label``/``correct`` and ACC1 when --images is a folder of class folders named as the
model's classes). Existing output is not overwritten unless --force. Exit codes: 0 done,
1 no image could be read, 2 bad arguments or model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import UsageError, exit_if_known
from utils.images import DatasetError, ImageReadError, collect_images, labels_from_folder, open_rgb
from utils.predictions import prediction_row, ranked, top_k_lines, write_predictions

METADATA_NAME = "classifier"  # export.py's metadata entry (and <model>.json beside the file)
METADATA_KEYS = ("class_names", "img_size", "mean", "std")


class ModelMetadataError(ValueError):
    """A model without the metadata predicting needs; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict image classes with an ONNX model from export.py "
                                            "(numpy, Pillow and onnxruntime; no PyTorch).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, default=argparse.SUPPRESS, help="the .onnx file from export.py")
    p.add_argument("--images", required=True, default=argparse.SUPPRESS,
                   help="an image, a folder (recursive) or a glob pattern")
    p.add_argument("--output", default="predictions.csv", help="CSV file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--topk", type=int, default=5, help="classes listed per image")
    p.add_argument("--batch-size", type=int, default=16, help="images per run of the model")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime's threads (0: its choice)")
    return p


def read_metadata(session, model_path: Path) -> dict:
    """The metadata in the model, else in ``<model>.json``; checked for what predicting needs."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_NAME)
    sidecar = model_path.with_name(model_path.name + ".json")
    if text is None and sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8")
    if text is None:
        raise ModelMetadataError(f"{model_path} has no {METADATA_NAME!r} metadata and there is no {sidecar}: "
                                 "export the model with export.py")
    try:
        metadata = json.loads(text)
        missing = [key for key in METADATA_KEYS if key not in metadata]
    except (ValueError, TypeError) as exc:
        raise ModelMetadataError(f"the metadata of {model_path} is not a JSON object: {exc}") from exc
    if missing:
        raise ModelMetadataError(f"the metadata of {model_path} lacks {', '.join(missing)}")
    return metadata


def preprocess(image: Image.Image, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """An RGB image as the model's input ``(3, size, size)`` float32, as test.py makes it."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)  # Pillow's resize always antialiases
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    return ((pixels - mean) / std).transpose(2, 0, 1)


def load_batch(files: list, metadata: dict) -> tuple[list, list[str]]:
    """``(input arrays of the readable files, one error message or "" per file)``."""
    size = int(metadata["img_size"])
    mean, std = (np.asarray(metadata[key], dtype=np.float32) for key in ("mean", "std"))
    arrays, errors = [], []
    for path in files:
        try:
            arrays.append(preprocess(open_rgb(path), size, mean, std))
            errors.append("")
        except ImageReadError as exc:
            errors.append(str(exc))
    return arrays, errors


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predict_rows(session, files: list, metadata: dict, labels, k: int, batch_size: int) -> tuple[list, int]:
    """``(CSV rows, images predicted correctly)`` for ``files`` in batches."""
    names, input_name = metadata["class_names"], session.get_inputs()[0].name
    rows, correct = [], 0
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        arrays, errors = load_batch(chunk, metadata)
        probabilities = iter(softmax(session.run(None, {input_name: np.stack(arrays)})[0]) if arrays else [])
        for offset, (path, error) in enumerate(zip(chunk, errors)):
            if error:
                row = {"file": str(path), "error": error}
            else:
                p = next(probabilities)
                top = ranked(p, k)
                row = prediction_row(str(path), p, names, top)
            if labels is not None:
                label = labels[start + offset]
                row["label"] = names[label]
                if not error:
                    row["correct"] = int(top[0] == label)
                    correct += row["correct"]
            rows.append(row)
    return rows, correct


def run(args) -> int:
    import onnxruntime

    if args.batch_size < 1 or args.topk < 1 or args.threads < 0:
        raise UsageError("--batch-size and --topk must be >= 1, --threads >= 0")
    out, model_path = Path(args.output), Path(args.model)
    if out.is_dir():
        raise UsageError(f"--output {out} is a folder; give a CSV file name")
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to overwrite or choose another --output")
    if not model_path.is_file():
        raise ModelMetadataError(f"model not found: {model_path}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    metadata = read_metadata(session, model_path)
    files, folder = collect_images(args.images)
    labels = labels_from_folder(files, folder, metadata["class_names"])
    k = min(args.topk, len(metadata["class_names"]))
    rows, correct = predict_rows(session, files, metadata, labels, k, args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(out, rows, k, labels is not None)
    read = [row for row in rows if not row["error"]]
    print(f"wrote {len(read)} predictions to {out}")
    if len(rows) == 1 and read:
        print(f"{read[0]['file']}:\n" + "\n".join(top_k_lines(read[0], k)))
    for row in rows:
        if row["error"]:
            print(f"could not read: {row['error']}", file=sys.stderr)
    if labels is not None and read:
        print(f"ACC1 {100.0 * correct / len(read):.2f} % ({len(read)} images)")
    return 0 if read else 1


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = run(args)
    except ImportError as exc:
        print(f"error: {exc} (pip install onnxruntime numpy pillow)", file=sys.stderr)
        code = 2
    except Exception as exc:
        if type(exc).__module__.split(".")[0] == "onnxruntime":  # a file it cannot load or run
            print(f"error: onnxruntime: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        exit_if_known(exc, code=2, known=(ModelMetadataError, DatasetError, UsageError),
                      memory_hint=f"the run used --batch-size {args.batch_size}; lower --batch-size")
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
