"""Self-describing checkpoints, written atomically and read with ``weights_only=True``,
and the run folder that holds them.

A checkpoint written by train.py is a dict of tensors and plain Python values only::

    model          state dict of the raw model (no "module." prefixes)
    model_ema      state dict of the EMA weights, or None when EMA was off
    best_source    "model" or "ema": which of the two gave best_acc1
    optimizer, scaler, scheduler, rng     training state (None in best.pth)
    pretrained_cfg the preprocessing as timm's pretrained_cfg entries (input_size,
                   interpolation, crop_pct, crop_mode, mean, std, num_classes, label_names)
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

``best.pth`` holds what inference needs: the weights it was chosen on (``model`` when
``best_source`` is "model", else ``model_ema``; the other entry is None) and the metadata.
Files written before that hold both; every reader takes either. ``last.pth`` holds
everything ``--resume`` needs. ``best.safetensors`` (train.py ``--save-safetensors``) and
export.py's safetensors files hold one set of weights and, as JSON in the header, the
other entries, with ``weights`` ("raw" or "EMA") naming the set (see :func:`save_safetensors`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from models import CheckpointError, apply_pretrained_cfg, preprocessing_cfg, read_checkpoint
from models._helpers import SAFETENSORS_METADATA_KEY
from utils.distributed import unwrap_model
from utils.images import atomic_replace
from utils.run_folder import acquire_run_lock, clear_run_folder, release_run_lock
from utils.seed import get_rng_state, seed_everything, set_rng_state

FORMAT = "groupmamba-toolkit/1"
INFERENCE_KEYS = ("model", "model_name", "model_kwargs", "class_names", "mean", "std",
                  "img_size")
RESUME_KEYS = INFERENCE_KEYS + ("optimizer", "scaler", "scheduler", "epoch",
                                "global_step", "best_acc1", "args")


def to_plain(obj: Any) -> Any:
    """Namespaces, paths, tuples, numpy scalars -> dicts, strings, lists, numbers."""
    if isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
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
    """``torch.save`` through :func:`utils.images.atomic_replace`: an interrupted save never
    leaves a half-written checkpoint at ``path``; a full disk or a read-only folder raises
    an ``OSError`` naming ``path`` (torch.save reports it as a RuntimeError about file
    positions). The file stays private to its owner (0o600), as mkstemp makes it."""
    with atomic_replace(path, public=False) as tmp, open(tmp, "wb") as fh:
        torch.save(dict(state), fh)  # through a Python file: a full disk comes up as an OSError
    return Path(path)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], entries: Mapping[str, Any],
                     path: str | os.PathLike) -> Path:
    """``state_dict`` as a ``.safetensors`` file with ``entries`` (plain values, a checkpoint's
    other entries) as JSON under the header's ``"checkpoint"`` key, written atomically like
    :func:`save_checkpoint`: every checkpoint reader takes it as a checkpoint of ours."""
    from safetensors.torch import save

    # copies: safetensors refuses tensors that share memory
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
    header = {SAFETENSORS_METADATA_KEY: json.dumps(to_plain(entries), ensure_ascii=False)}
    data = save(tensors, metadata=header)  # bytes, written by Python: a full disk is an OSError
    with atomic_replace(path, public=False) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


# a best.pth's entries that a safetensors copy leaves out: its weights and the training state
_NOT_IN_SAFETENSORS = ("model", "model_ema", "optimizer", "scaler", "scheduler", "rng")


def save_best(checkpoint: Mapping[str, Any], folder: Path, safetensors: bool = False) -> None:
    """best.pth in ``folder`` and, with ``safetensors``, best.safetensors (its weights, named
    by ``weights``, and its other entries)."""
    save_checkpoint(checkpoint, folder / "best.pth")
    if safetensors:
        state, which = choose_weights(dict(checkpoint), "auto", folder / "best.pth")
        entries = {k: v for k, v in checkpoint.items() if k not in _NOT_IN_SAFETENSORS}
        save_safetensors(state, {**entries, "weights": which}, folder / "best.safetensors")


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = (),
                    purpose: str = "") -> dict:
    """Load with ``weights_only=True`` on the CPU and check ``required`` keys.

    Raises CheckpointError for a missing file, a file torch cannot read, a file
    holding more than tensors and plain values, or missing keys.
    """
    ckpt = read_checkpoint(path)
    require_keys(ckpt, path, required, purpose)
    return ckpt


def require_keys(ckpt: Any, path: str | os.PathLike, required: tuple[str, ...] = (),
                 purpose: str = "") -> None:
    """CheckpointError unless ``ckpt`` is a dict holding every key of ``required``."""
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


def weight_sets(ckpt: Mapping) -> dict[str, Mapping]:
    """The weights a checkpoint of ours holds, by kind: ``{"raw": ..., "EMA": ...}``, either
    may be missing. A safetensors file keeps its one set under ``model``, named by ``weights``."""
    sets = {}
    if ckpt.get("model"):
        sets["EMA" if ckpt.get("weights") == "EMA" else "raw"] = ckpt["model"]
    if ckpt.get("model_ema"):
        sets["EMA"] = ckpt["model_ema"]
    return sets


def choose_weights(ckpt: dict, mode: str, path: str | os.PathLike) -> tuple[dict, str]:
    """``(state dict, "raw" or "EMA")`` of a checkpoint of ours. ``mode``: ``auto`` (the
    weights that were best in training, see ``best_source``), ``model`` or ``ema``."""
    sets = weight_sets(ckpt)
    wanted = {"ema": "EMA", "model": "raw"}.get(mode)
    if wanted is None:  # auto: the best_source's set, else the one there is
        preferred = "EMA" if ckpt.get("best_source") == "ema" else "raw"
        wanted = preferred if preferred in sets else next(iter(sets), preferred)
    if wanted in sets:
        return sets[wanted], wanted
    raise _missing_weights(ckpt, path, wanted, sets)


def _missing_weights(ckpt: Mapping, path, wanted: str, sets: Mapping) -> CheckpointError:
    if not sets:
        return CheckpointError(f"{path} holds no weights")
    args = ckpt.get("args") or {}
    if wanted == "EMA" and "ema_decay" in args and not args["ema_decay"]:
        return CheckpointError(f"{path} has no EMA weights (trained with --ema-decay 0)")
    why = ""
    if "best_source" in ckpt and ckpt.get("optimizer") is None:  # a best.pth
        why = f" (it keeps only the {next(iter(sets))} weights it was chosen on; last.pth holds both)"
    return CheckpointError(f"{path} has no {wanted} weights{why}")


@dataclass
class RunState:
    """Where the run stands; saved in last.pth and restored by --resume."""
    epochs: int  # the planned length (--fit-time-limit may shorten it)
    epoch: int = 0
    global_step: int = 0
    best_acc1: float = -1.0
    best_epoch: int = 0
    best_source: str = "model"
    history: list = field(default_factory=list)


def restore_training(ckpt: dict, parts, classes: list[str], env, config, steps_per_epoch: int) -> RunState:
    """Load a last.pth into train.py's training objects (``parts``: model, ema, optimizer,
    scheduler, precision); returns where the run stood. The learning-rate schedule is a
    function of the step count and the arguments (utils/optim.py), so it is set from
    ``global_step`` rather than read back: more ``--epochs`` stretch it, a new ``--lr`` counts.
    It goes by epochs: with another number of steps per epoch (another number of processes
    or ``--batch-size``) the run continues from the end of the checkpoint's epoch."""
    log = logging.getLogger("train")
    epoch, global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
    if epoch >= config.epochs:
        raise SystemExit(f"error: {config.resume} has already trained {epoch} epochs; pass --epochs "
                         "larger than that to continue")
    if ckpt["class_names"] != classes:
        raise CheckpointError(f"the data's classes {classes} differ from the checkpoint's {ckpt['class_names']}")
    parts.model.load_state_dict(ckpt["model"])
    if parts.ema is not None and ckpt.get("model_ema") is not None:
        parts.ema.module.load_state_dict(ckpt["model_ema"])
    elif parts.ema is not None:
        log.warning("checkpoint has no EMA weights: EMA restarts from the model's")
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    if global_step != epoch * steps_per_epoch:
        log.info("%s took %.4g steps per epoch, this run takes %d: the schedule continues from step %d, the end "
                 "of epoch %d", config.resume, global_step / max(epoch, 1), steps_per_epoch,
                 epoch * steps_per_epoch, epoch)
        global_step = epoch * steps_per_epoch
    parts.scheduler.step_update(global_step)  # the rate of the next step
    if ckpt.get("scaler"):
        parts.precision.scaler.load_state_dict(ckpt["scaler"])
    if env.world_size == 1:
        set_rng_state(ckpt.get("rng"))  # rank 0's state, when the checkpoint's run had several processes
    else:  # one saved state cannot serve every rank: re-seed per rank and epoch
        seed_everything(config.seed + 1000 * epoch, env.rank)
    state = RunState(config.epochs, epoch, global_step, float(ckpt["best_acc1"]), int(ckpt.get("best_epoch") or 0),
                     ckpt.get("best_source") or "model", list(ckpt.get("history") or []))
    log.info("resumed from %s at epoch %d (best ACC1 %.2f %%)", config.resume, state.epoch, state.best_acc1)
    return state


def run_description(model: torch.nn.Module, img_size: int, class_names: list[str], mean, std) -> dict:
    """The ``class_names``, ``mean``, ``std`` and ``pretrained_cfg`` entries of a run's
    checkpoints; ``model.pretrained_cfg`` is set to that preprocessing too."""
    cfg = preprocessing_cfg(img_size, mean, std, class_names)
    apply_pretrained_cfg(unwrap_model(model), cfg)
    return {"class_names": list(class_names), "mean": list(mean), "std": list(std), "pretrained_cfg": cfg}


def training_checkpoint(config, parts, state: RunState, meta: dict, full: bool) -> dict:
    """best.pth (``full`` False: what inference needs, with the weights of ``best_source``
    only) or last.pth (all --resume needs), in the format above; ``meta``: run_description's."""
    ema = parts.ema.module.state_dict() if parts.ema is not None else None
    keep_raw, keep_ema = full or state.best_source != "ema", full or state.best_source == "ema"
    return {"format": FORMAT, "model": unwrap_model(parts.model).state_dict() if keep_raw else None,
            "model_ema": ema if keep_ema else None,
            "optimizer": parts.optimizer.state_dict() if full else None,
            "scaler": parts.precision.scaler.state_dict() if full else None,
            "scheduler": parts.scheduler.state_dict() if full else None,
            "rng": get_rng_state() if full else None,
            **{k: v for k, v in asdict(state).items() if k != "epochs"},
            "model_name": config.model, "model_kwargs": to_plain(parts.model_kwargs), **meta,
            # the arguments as run: --fit-time-limit may have shortened --epochs
            "img_size": int(config.img_size), "args": {**to_plain(config), "epochs": state.epochs},
            "teacher": to_plain(parts.teacher.info) if parts.teacher is not None else None}


def prepare_run_folder(config, owned_files: tuple[str, ...]) -> tuple[Path, list[str]]:
    """Create and lock train.py's run folder (``--output``, else the ``--resume`` checkpoint's
    folder, else ``runs/<time>``) and clear what an earlier run left there (see
    utils/run_folder.py); returns the folder and notes for the log. The lock is released
    by ``release_run_lock`` when the run ends."""
    out = Path(config.output or (Path(config.resume).parent if config.resume else
                                 Path("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))))
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    notes = acquire_run_lock(out)
    try:  # a refused folder is left as it was, unlocked
        resuming_here = bool(config.resume) and Path(config.resume).resolve().parent == out.resolve()
        notes += clear_run_folder(out, owned_files, config.force, resuming_here)
    except BaseException:
        release_run_lock(out)
        raise
    return out, notes
