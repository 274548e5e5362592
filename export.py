"""Export a trained classifier for deployment.

    python export.py --checkpoint runs/mine/best.pth --format onnx
    python export.py --checkpoint runs/mine/best.pth --format pt2 --output model.pt2
    python export.py --checkpoint runs/mine/best.pth --format safetensors
    python export.py --checkpoint groupmamba_tiny.pth --model groupmamba_tiny --format onnx

Formats (the default --output is the checkpoint's name with the format's extension):

onnx
    An ONNX graph (opset --opset) with a dynamic batch: input ``images``, float32
    ``(batch, 3, img_size, img_size)``, normalised as in training; output ``logits``
    ``(batch, classes)``. predict_onnx.py predicts with it through onnxruntime, no torch.
pt2
    A torch.export program with a dynamic batch, same input and output
    (``torch.export.load(path).module()(images)``).
safetensors
    The weights, with the checkpoint's description in the header: test.py,
    ``models.Classifier`` and ``models.load_pretrained`` read it as a checkpoint.

The model is exported in eval mode, in float32, with GroupMamba's portable pure-PyTorch
scan. What predicting needs besides the model (class names, image size, mean, std, the
resize) is written beside it as ``<output>.json``, and also into the file: the ONNX
metadata entry ``classifier``, the pt2 extra file ``classifier.json``.

--check (on by default) runs the exported model at batch 1 and 4 and compares its
logits with PyTorch's. Files are written atomically; existing ones are kept unless
--force. Exit codes: 0 done, 1 the check failed, 2 bad arguments or checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from models import CheckpointError, Classifier, ModelConfigError, preprocessing_cfg
from utils.checkpoint import FORMAT, save_safetensors
from utils.errors import exit_if_known, reraise_with_path
from utils.images import atomic_write_json, check_writable

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "safetensors": ".safetensors"}
METADATA_NAME = "classifier"  # the ONNX metadata key; the pt2 extra file is METADATA_NAME + ".json"
CHECK_BATCHES = (1, 4)
# largest difference allowed between the exported model's logits and PyTorch's (float32),
# relative to the largest logit when that is above 1
CHECK_TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that cannot be made; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a trained classifier: ONNX, torch.export (pt2) or safetensors.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                   help="best.pth from train.py, or an official release file with --model")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), default=argparse.SUPPRESS,
                   help="onnx, pt2 (torch.export) or safetensors (weights)")
    p.add_argument("--output", default=None, help="file to write; unset: the checkpoint's name with the format's extension")
    p.add_argument("--model", default=None,
                   help="the timm model name of a file without metadata (official release files)")
    p.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                   help="auto: the weights that were best in training (raw or EMA)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size of the exported model; unset: the checkpoint's (224 for release files)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or later)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="the ONNX exporter: torchscript (torch.onnx's tracing exporter) or dynamo "
                        "(torch.export-based; several minutes for groupmamba_tiny on a CPU)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare the exported model's logits with PyTorch's at batch 1 and 4 "
                        "(onnx: needs onnxruntime)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    return p


# ----------------------------------------------------------------------- writing

def output_paths(args) -> tuple[Path, Path]:
    """``(the exported file, its .json metadata)``."""
    output = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(FORMATS[args.format])
    if output.resolve() == Path(args.checkpoint).resolve():
        raise ExportError(f"--output {output} is the checkpoint itself; choose another --output")
    return output, output.with_name(output.name + ".json")


def claim_outputs(paths: tuple[Path, ...], force: bool) -> None:
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise ExportError(f"{folders[0]} is a folder; give --output a file name")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ExportError(f"{', '.join(existing)} already exist(s); pass --force to overwrite or choose "
                          "another --output")
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    check_writable(paths[0])  # a read-only folder is said now, not after the export


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary path in ``path``'s folder, renamed to ``path`` when the block succeeds:
    an interrupted export never leaves a half-written file under the real name."""
    try:  # the real extension last: readers (torch.export, safetensors) go by it
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as exc:
        reraise_with_path(exc, path)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the usual permissions, not mkstemp's private ones
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_metadata(clf: Classifier, fmt: str, checkpoint: str) -> dict:
    """What predicting with the exported model needs, as plain JSON values."""
    size = clf.img_size
    return {"format": f"{FORMAT}/export", "exported_as": fmt, "source": os.path.basename(checkpoint),
            **clf.metadata(),
            "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32",
                      "preprocessing": "RGB resized to img_size x img_size (bilinear, antialiased), "
                                       "scaled to 0..1, then (x - mean) / std per channel"},
            "output": {"name": "logits", "shape": ["batch", len(clf.class_names)]}}


# ----------------------------------------------------------------------- formats

class Logits(torch.nn.Module):
    """The classifier's logits as one tensor (models with two heads give their mean in eval mode)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.model(images)
        return torch.stack(tuple(outputs)).mean(0) if isinstance(outputs, (tuple, list)) else outputs


def example_batch(clf: Classifier, batch: int = 2) -> torch.Tensor:
    # two images or more: a batch of 1 would let the exporters fix the batch size
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, clf.img_size, clf.img_size, generator=generator)


def export_onnx(clf: Classifier, path: str, metadata: dict, opset: int, exporter: str) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("--format onnx needs the onnx package: pip install onnx onnxruntime "
                          "(or pip install -e .[export])") from exc
    if opset < 17:
        raise ExportError(f"--opset must be 17 or later, got {opset}")
    module, example = Logits(clf.model).eval(), (example_batch(clf),)
    buffer = io.BytesIO()
    if exporter == "dynamo":  # the graph optimiser is left out: it takes too long on this model
        program = torch.onnx.export(module, example, dynamo=True, optimize=False, opset_version=opset,
                                    input_names=["images"], output_names=["logits"], external_data=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        program.save(buffer)
    else:
        torch.onnx.export(module, example, buffer, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    model.metadata_props.add(key=METADATA_NAME, value=json.dumps(metadata, ensure_ascii=False))
    onnx.save(model, path)


def export_pt2(clf: Classifier, path: str, metadata: dict) -> torch.export.ExportedProgram:
    program = torch.export.export(Logits(clf.model).eval(), (example_batch(clf),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), strict=False)
    torch.export.save(program, path, extra_files={f"{METADATA_NAME}.json": json.dumps(metadata, ensure_ascii=False)})
    return program


def export_safetensors(clf: Classifier, path: str, metadata: dict) -> None:
    # the entries a checkpoint of train.py has, so every checkpoint reader takes the file
    entries = {"format": FORMAT, **{k: metadata[k] for k in ("model_name", "model_kwargs", "class_names",
                                                              "img_size", "mean", "std")},
               "weights": metadata["weights"],
               "pretrained_cfg": preprocessing_cfg(clf.img_size, clf.mean, clf.std, clf.class_names)}
    save_safetensors(clf.model.state_dict(), entries, path)


def export_model(clf: Classifier, args, path: str, metadata: dict):
    """Write the format to ``path``; returns what :func:`check_export` runs (a pt2 program)."""
    if args.format == "onnx":
        # the tracer warns about every shape test it records as a constant: intended, the
        # graph is made for one image size; the exporters' deprecation notices are not news here
        with warnings.catch_warnings(), torch.no_grad():  # no autograd graph: a faster trace
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            export_onnx(clf, path, metadata, args.opset, args.exporter)
        return None
    if args.format == "pt2":
        return export_pt2(clf, path, metadata)
    export_safetensors(clf, path, metadata)
    return None


# ----------------------------------------------------------------------- checking

class CheckError(RuntimeError):
    """The exported model computes something else than the PyTorch model."""


def exported_runner(fmt: str, path: str, program):
    """The exported model as a function of an image batch, or None when it cannot run here."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its notes on constant folding are not for users
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    if fmt == "pt2":  # the program just exported (loading the file back is slow for big models)
        return program.module()
    reloaded = Classifier.from_checkpoint(path, "cpu", "auto", scan_backend="torch", amp="off")
    return Logits(reloaded.model).eval()


def check_export(clf: Classifier, fmt: str, path: str, program) -> str:
    """One line on how far the exported logits are from PyTorch's; CheckError when too far."""
    run = exported_runner(fmt, path, program)
    if run is None:
        return "check skipped: onnxruntime is not installed (pip install onnxruntime)"
    reference, parts, worst = Logits(clf.model).eval(), [], 0.0
    for batch in CHECK_BATCHES:
        images = example_batch(clf, batch)
        with torch.no_grad():
            expected, got = reference(images), run(images)
        difference = (got - expected).abs().max().item()
        worst = max(worst, difference / max(1.0, expected.abs().max().item()))
        parts.append(f"batch {batch}: {difference:.2e}")
    line = f"largest difference from PyTorch's logits: {', '.join(parts)}"
    if not worst <= CHECK_TOLERANCE:
        raise CheckError(f"{line}; more than {CHECK_TOLERANCE:g}: the export is wrong, nothing was written")
    return line


# ----------------------------------------------------------------------- main

def run(args) -> int:
    if args.img_size is not None and args.img_size < 1:
        raise ExportError(f"--img-size must be positive, got {args.img_size}")
    output, sidecar = output_paths(args)
    claim_outputs((output, sidecar), args.force)
    clf = Classifier.from_checkpoint(args.checkpoint, "cpu", args.weights, scan_backend="torch", amp="off",
                                     model_name=args.model, img_size=args.img_size)
    metadata = export_metadata(clf, args.format, args.checkpoint)
    print(f"{args.checkpoint}: {clf.model_name}, {clf.weights} weights, {len(clf.class_names)} classes, "
          f"{clf.img_size} px -> {output} ({args.format})", flush=True)
    with atomic_path(output) as tmp:
        started = time.perf_counter()
        program = export_model(clf, args, tmp, metadata)
        print(f"exported in {time.perf_counter() - started:.1f} s ({os.path.getsize(tmp) / 2 ** 20:.1f} MiB)",
              flush=True)
        if args.check:
            started = time.perf_counter()
            line = check_export(clf, args.format, tmp, program)
            print(f"{line} (checked in {time.perf_counter() - started:.1f} s)")
    atomic_write_json(sidecar, metadata)
    print(f"wrote {output} and {sidecar}")
    return 0


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = run(args)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except Exception as exc:
        exit_if_known(exc, code=2, known=(ExportError, CheckpointError, ModelConfigError),
                      memory_hint="export needs the model and a batch of 4 images in memory")
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
