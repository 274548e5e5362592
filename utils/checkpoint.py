"""Self-describing checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint written by train.py is a dict of tensors and plain Python values only::

    model          state dict of the raw model (no "module." prefixes)
    model_ema      state dict of the EMA weights, or None when EMA was off
    best_source    "model" or "ema": which of the two gave best_acc1
    optimizer, scaler, scheduler, rng     training state (None in best.pth)
    epoch          epochs completed (1-based count)
    global_step    optimizer steps taken
    best_acc1      best validation top-1 (percent) so far, best_epoch its epoch
    model_name     timm name, model_kwargs: kwargs for timm.create_model
                   (num_classes, drop_path_rate, distillation, ...)
    class_names    list, index = class id
    mean, std      normalisation used; img_size
    args           train.py's final arguments as a dict of plain values
    history        per-epoch metrics so far (list of dicts)
    teacher        None, or what the distillation teacher was (file, sha256, model
                   name and kwargs, weights used, ...; see utils/distillation.py)
    format         "groupmamba-toolkit/1"

``best.pth`` holds what inference needs (weights, EMA weights and the metadata);
``last.pth`` holds everything ``--resume`` needs as well.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

FORMAT = "groupmamba-toolkit/1"
INFERENCE_KEYS = ("model", "model_name", "model_kwargs", "class_names", "mean", "std",
                  "img_size")
RESUME_KEYS = INFERENCE_KEYS + ("optimizer", "scaler", "scheduler", "epoch",
                                "global_step", "best_acc1", "args")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for what was asked; the message says why."""


def to_plain(obj: Any) -> Any:
    """Namespaces, paths, tuples, numpy scalars -> dicts, strings, lists, numbers."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)


def to_cpu(obj: Any) -> Any:
    """A snapshot of ``obj`` with every tensor copied to the CPU (never aliased, so
    later training steps do not change it); other values are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``:
    an interrupted save never leaves a half-written checkpoint at ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = (),
                    purpose: str = "") -> dict:
    """Load with ``weights_only=True`` on the CPU and check ``required`` keys.

    Raises CheckpointError for a missing file, a file torch cannot read, a file
    holding more than tensors and plain values, or missing keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all land here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load {path} as a PyTorch checkpoint with weights_only=True: "
            f"{first}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in ckpt]
    if missing:
        what = f" for {purpose}" if purpose else ""
        hint = ""
        if "model_name" not in ckpt:
            hint = (" -- it does not look like a checkpoint written by train.py (an "
                    "official release file can be used with train.py --pretrained)")
        raise CheckpointError(f"{path} lacks {', '.join(missing)}{what}{hint}")
    return ckpt


def check_checkpoint(ckpt: dict, path: str | os.PathLike) -> None:
    """The metadata of a checkpoint of ours must describe a model we can rebuild."""
    names = ckpt["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: class_names is not a list of names")
    kwargs = ckpt["model_kwargs"]
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: model_kwargs is not a dict")
    if kwargs.get("num_classes", len(names)) != len(names):
        raise CheckpointError(f"{path}: {len(names)} class names but the model has "
                              f"num_classes={kwargs.get('num_classes')}")
    if len(ckpt["mean"]) != 3 or len(ckpt["std"]) != 3 or int(ckpt["img_size"]) < 1:
        raise CheckpointError(f"{path}: mean/std need 3 values and img_size must be positive")


def choose_weights(ckpt: dict, mode: str, path: str | os.PathLike) -> tuple[dict, str]:
    """``(state dict, "raw" or "EMA")`` of a checkpoint of ours. ``mode``: ``auto`` (the
    weights that were best in training, see ``best_source``), ``model`` or ``ema``."""
    ema = ckpt.get("model_ema")
    if mode == "ema":
        if not ema:
            raise CheckpointError(f"{path} has no EMA weights (trained with --ema-decay 0)")
        return ema, "EMA"
    if mode == "auto" and ckpt.get("best_source") == "ema" and ema:
        return ema, "EMA"
    return ckpt["model"], "raw"


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Strip ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def extract_state_dict(ckpt: Mapping[str, Any], prefer_ema: bool = False) -> dict:
    """The weights inside a checkpoint of ours or of the usual outside formats."""
    keys = (("model_ema", "state_dict_ema", "model", "state_dict") if prefer_ema
            else ("model", "state_dict", "model_ema", "state_dict_ema"))
    for key in keys:
        value = ckpt.get(key)
        if isinstance(value, Mapping) and value:
            return clean_state_dict(value)
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return clean_state_dict(ckpt)  # a bare state dict
    raise CheckpointError("no state dict found (looked for model, state_dict, "
                          "model_ema, state_dict_ema or a bare state dict)")


def classifier_names(model: torch.nn.Module) -> list[str]:
    """Module names of the classifier head(s), from timm's pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or []
    if isinstance(names, str):
        names = [names]
    names = list(names)
    for extra in ("head_dist", "dist_head"):
        if hasattr(model, extra) and extra not in names:
            names.append(extra)
    return names


def load_weights_dropping_head(model: torch.nn.Module, state_dict: Mapping[str, Any],
                               source: str = "checkpoint") -> list[str]:
    """Load ``state_dict`` into ``model``; head weights whose shape differs (another class
    count) are dropped and left freshly initialised. Anything else that does not fit is
    an error. Returns the dropped keys."""
    own = model.state_dict()
    heads = tuple(n + "." for n in classifier_names(model))
    dropped, mismatched = [], []
    state = {}
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            (dropped if key.startswith(heads) else mismatched).append(key)
            continue
        state[key] = value
    if mismatched:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: shape mismatch in "
            + ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                        for k in mismatched[:5])
            + (" ..." if len(mismatched) > 5 else ""))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(heads)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "")
            + (f"unexpected {result.unexpected_keys[:5]}"
               f"{' ...' if len(result.unexpected_keys) > 5 else ''}"
               if result.unexpected_keys else ""))
    return dropped
