"""Reading checkpoints and state dicts: the one place that does it.

Files are read on the CPU with ``torch.load(weights_only=True)``: tensors and plain
Python data only; ``.safetensors`` files with the safetensors library (a checkpoint of
ours saved that way keeps its other entries as JSON under the header's
``"checkpoint"`` metadata key, and reads back as the same dict). The weights inside may be

- a bare state dict (official GroupMamba release files),
- a state dict under ``model``, ``state_dict``, ``model_ema`` or ``state_dict_ema``
  (this toolkit's checkpoints, official training snapshots, timm's and most other
  training scripts; a checkpoint of ours whose ``best_source`` is ``"ema"`` gives its
  EMA weights first, the ones it was chosen on),

with DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes on the keys.
:func:`load_pretrained` fits such weights to a model: heads of another class count
are replaced by the model's fresh ones (or refused, for inference), a ``dist_head``
the model lacks is dropped, and anything else that does not fit is a
:class:`CheckpointError` listing the keys.

A checkpoint of ours also says how its images were preprocessed; :func:`checkpoint_cfg`
gives that as timm's ``pretrained_cfg`` entries and :func:`apply_pretrained_cfg` puts them
on a model, so ``timm.data.resolve_data_config(model=model)`` returns them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "LoadInfo", "SAFETENSORS_METADATA_KEY", "apply_pretrained_cfg", "checkpoint_cfg",
           "classifier_names", "clean_state_dict", "filter_state_dict", "load_pretrained", "preprocessing_cfg",
           "read_checkpoint", "unwrap_state_dict"]

_logger = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")
# where a checkpoint dict keeps its weights, in order of preference: the trained weights
# (ours and the official snapshots under "model", timm's under "state_dict") before an
# EMA copy, for files that carry only that
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
# the safetensors header entry holding a checkpoint's entries other than its weights
SAFETENSORS_METADATA_KEY = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message says why."""


@dataclass
class LoadInfo:
    """What :func:`load_pretrained` did."""
    source: str = "bare"  # the entry the weights came from ("model", ...), or "bare"
    stripped_prefixes: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)  # head keys whose class count differed
    dropped: list[str] = field(default_factory=list)  # head keys the model has no module for
    missing: list[str] = field(default_factory=list)  # only with strict=False
    unexpected: list[str] = field(default_factory=list)  # only with strict=False
    metadata: dict = field(default_factory=dict, repr=False)  # other entries of a training checkpoint

    def __str__(self) -> str:
        parts = [f"weights from {'the bare state dict' if self.source == 'bare' else repr(self.source)}"]
        if self.stripped_prefixes:
            parts.append(f"stripped {', '.join(map(repr, self.stripped_prefixes))}")
        if self.reinitialized:
            heads = sorted({key.split('.')[0] for key in self.reinitialized})
            parts.append(f"re-initialised {', '.join(heads)} (class count differs)")
        if self.dropped:
            heads = sorted({key.split('.')[0] for key in self.dropped})
            parts.append(f"dropped {', '.join(heads)} (model has none)")
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys")
        return "; ".join(parts)


def _read_safetensors(path: Union[str, os.PathLike]) -> dict:
    """The state dict of a ``.safetensors`` file, or the checkpoint dict whose other entries
    its header keeps under :data:`SAFETENSORS_METADATA_KEY`."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415 - only for these files

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as fh:
            entries = (fh.metadata() or {}).get(SAFETENSORS_METADATA_KEY)
            state_dict = {key: fh.get_tensor(key) for key in fh.keys()}
        entries = json.loads(entries) if entries else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load {os.fspath(path)} as a safetensors file: {exc}") from exc
    if entries is None:
        return state_dict
    if not isinstance(entries, dict):
        raise CheckpointError(f"{os.fspath(path)}: the {SAFETENSORS_METADATA_KEY!r} metadata is not a JSON object")
    return {**entries, "model": state_dict}


def read_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with readable errors;
    ``.safetensors`` files through safetensors (see the module's docstring)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {os.fspath(path)}")
    if os.fspath(path).lower().endswith(".safetensors"):
        return _read_safetensors(path)
    try:
        # argparse.Namespace is plain data; training scripts often save their arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all land here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load {os.fspath(path)} with torch.load(weights_only=True): {first}. Only tensors "
            "and plain Python data are loaded; if you trust the file, re-save its weights: "
            "torch.save(torch.load(path, weights_only=False)['model'], new_path)") from exc


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(checkpoint: Mapping) -> tuple[Mapping, str]:
    """``(state dict, where it came from)``: the dict itself when bare, else the first
    entry of ``_WRAPPER_KEYS`` that holds one."""
    if _is_state_dict(checkpoint):
        return checkpoint, "bare"
    if isinstance(checkpoint, Mapping):
        keys = _WRAPPER_KEYS
        if checkpoint.get("best_source") == "ema":  # ours, best with its EMA weights
            keys = ("model_ema",) + tuple(k for k in keys if k != "model_ema")
        for key in keys:
            if _is_state_dict(checkpoint.get(key)):
                return checkpoint[key], key
    keys = list(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise CheckpointError("the file holds no state dict: expected a dict of tensors or one under "
                          f"{', '.join(map(repr, _WRAPPER_KEYS))}; found {_format_keys(keys)}")


def clean_state_dict(state_dict: Mapping) -> tuple[dict, list[str]]:
    """``(state dict without module./_orig_mod. prefixes, the prefixes found)``."""
    cleaned, seen = {}, set()
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
                    seen.add(prefix)
        cleaned[key] = value
    return cleaned, sorted(seen)


def classifier_names(model: nn.Module) -> list[str]:
    """Module names of the classifier head(s): timm's ``pretrained_cfg["classifier"]`` (else
    the module ``get_classifier()`` returns) plus a distillation head (``dist_head``,
    ``head_dist``) the model has."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or []
    names = [names] if isinstance(names, str) else list(names)
    if not names and hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        names = [name for name, module in model.named_modules() if module is classifier and name][:1]
    names += [extra for extra in ("dist_head", "head_dist") if extra not in names and hasattr(model, extra)]
    return names


def _format_keys(keys: Sequence[str], limit: int = 20) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{', '.join(map(str, keys[:limit]))}{more}]"


def _fit_heads(state_dict: dict, model: nn.Module, target: Mapping, info: LoadInfo, reset_head: bool) -> None:
    """Head keys whose shape differs get the model's fresh weights (``reset_head``); head
    keys the model has no module for (a ``dist_head`` without distillation) are dropped."""
    heads = tuple(classifier_names(model)) + ("dist_head", "head_dist")
    is_head = lambda key: any(key == h or key.startswith(h + ".") for h in heads)  # noqa: E731
    for key in [k for k in state_dict if is_head(k)]:
        if key not in target:
            del state_dict[key]
            info.dropped.append(key)
        elif reset_head and state_dict[key].shape != target[key].shape:
            state_dict[key] = target[key].detach().clone()
            info.reinitialized.append(key)
    if info.reinitialized:
        _logger.warning("the checkpoint's heads have a different class count (%d in the model); keeping "
                        "the model's freshly initialised %s", getattr(model, "num_classes", -1),
                        ", ".join(info.reinitialized))
    if info.dropped:
        _logger.warning("the model has no module for these head weights; dropped: %s", ", ".join(info.dropped))


def _check_compatible(state_dict: Mapping, target: Mapping, info: LoadInfo, strict: bool, kind: str) -> None:
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches {_format_keys(mismatched)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing keys {_format_keys(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {_format_keys(unexpected)}")
    if problems:
        hint = ""
        if len(missing) == len(target):
            hint = f" None of the checkpoint's keys belong to this model: is it a {kind} checkpoint?"
        elif mismatched or (missing and unexpected):
            hint = f" Is the checkpoint for a different {kind} variant?"
        raise CheckpointError("checkpoint does not fit this model: " + "; ".join(problems) + "." + hint)
    info.missing, info.unexpected = missing, unexpected


def filter_state_dict(checkpoint: Mapping, model: nn.Module, strict: bool = True,
                      reset_head: bool = True) -> tuple[dict, LoadInfo]:
    """The weights of ``checkpoint`` made loadable into ``model``, and what was done."""
    state_dict, source = unwrap_state_dict(checkpoint)
    info = LoadInfo(source=source)
    if source != "bare":
        info.metadata = {k: v for k, v in checkpoint.items() if not _is_state_dict(v)}
    state_dict, info.stripped_prefixes = clean_state_dict(state_dict)
    target = model.state_dict()
    _fit_heads(state_dict, model, target, info, reset_head)
    _check_compatible(state_dict, target, info, strict, type(model).__name__)
    return state_dict, info


def load_pretrained(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping], strict: bool = True,
                    reset_head: bool = True) -> LoadInfo:
    """Load a file (or an already loaded dict) of any of the formats above into ``model``.

    ``reset_head``: a head of another class count keeps the model's fresh weights (for
    fine-tuning); False makes that an error (for inference). With ``strict=False``
    missing and unexpected keys are reported in the returned :class:`LoadInfo`
    instead of raising; shape mismatches outside the heads always raise.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    state_dict, info = filter_state_dict(checkpoint, model, strict, reset_head)
    model.load_state_dict(state_dict, strict=strict)
    return info


# --------------------------------------------------------------------------- preprocessing

def preprocessing_cfg(img_size: int, mean: Sequence[float], std: Sequence[float],
                      class_names: Sequence[str] = ()) -> dict:
    """timm's ``pretrained_cfg`` entries for ``utils.transforms.eval_transform``: the whole
    image resized to ``img_size`` x ``img_size`` (bilinear, antialiased), normalised with
    ``mean``/``std``. timm's ``crop_mode="squash"`` at ``crop_pct=1.0`` is that resize
    ("center" would keep the aspect ratio and cut the longer side)."""
    cfg = {"input_size": (3, int(img_size), int(img_size)), "interpolation": "bilinear", "crop_pct": 1.0,
           "crop_mode": "squash", "mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}
    if class_names:
        cfg.update(num_classes=len(class_names), label_names=tuple(class_names))
    return cfg


def checkpoint_cfg(checkpoint: Mapping) -> dict | None:
    """The preprocessing a checkpoint of ours was trained with, as ``pretrained_cfg``
    entries: its ``pretrained_cfg`` entry, else (older checkpoints) one made from its
    ``img_size``, ``mean`` and ``std``; None for a file that does not say."""
    if not isinstance(checkpoint, Mapping):
        return None
    if isinstance(checkpoint.get("pretrained_cfg"), Mapping):
        return dict(checkpoint["pretrained_cfg"])
    if all(checkpoint.get(key) is not None for key in ("model_name", "img_size", "mean", "std")):
        return preprocessing_cfg(checkpoint["img_size"], checkpoint["mean"], checkpoint["std"],
                                 checkpoint.get("class_names") or ())
    return None


def apply_pretrained_cfg(model: nn.Module, cfg: Mapping) -> None:
    """``cfg`` merged over ``model.pretrained_cfg`` (timm's ``default_cfg`` too); the class
    count and names only when the model has that many classes (a re-initialised head does not)."""
    cfg = {key: tuple(value) if isinstance(value, list) else value for key, value in cfg.items()}
    if cfg.get("num_classes") != getattr(model, "num_classes", None):
        cfg = {key: value for key, value in cfg.items() if key not in ("num_classes", "label_names")}
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **cfg}
    model.default_cfg = model.pretrained_cfg
