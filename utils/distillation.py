"""Knowledge distillation from a trained teacher, as the GroupMamba paper trains its
models (the DeiT recipe: Touvron et al., "Training data-efficient image transformers
& distillation through attention", 2021).

The objective
-------------
GroupMamba has two heads: ``head`` learns the labels and ``dist_head`` learns the
teacher's predictions; in eval mode the model returns their mean. For one batch
(after Mixup/CutMix: the teacher sees exactly the images the student sees)::

    base    = criterion(head_logits, targets)          # the usual label loss
    soft:     distill = KL(softmax(teacher / T) || softmax(dist / T)) * T * T / dist.numel()
              (F.kl_div(log_softmax(dist / T), log_softmax(teacher / T),
                        reduction="sum", log_target=True), as in DeiT)
    hard:     distill = cross_entropy(dist, teacher.argmax(1))
    loss    = base * (1 - alpha) + distill * alpha

The teacher runs in eval mode, under ``torch.no_grad``, on the student's device and
inside the same autocast context; its parameters never receive gradients, so under
DistributedDataParallel it is not wrapped (each rank runs its own copy on its shard;
under DataParallel it is wrapped in DataParallel too, only to split the batch).

A student with a single output (a timm CNN, or GroupMamba with distillation=False)
gets both terms on that one output: ``loss = (1 - alpha) * criterion(out, targets) +
alpha * distill(out, teacher)``, i.e. classic knowledge distillation (Hinton et al.,
2015). DeiT's own ``DistillationLoss`` refuses such a student; here it is allowed and
the training log says which form is used.

Without a teacher (``--distillation-type none``) nothing here is used: a GroupMamba
student trains both heads on the labels (utils/engine.py).

Teachers (``--teacher``)
------------------------
* a checkpoint written by train.py (``best.pth``/``last.pth``, or a run folder for its
  ``best.pth``): self-describing, so
  model, weights (the ones that were best in training: raw or EMA, like test.py's
  ``--weights auto``) and class names come from the file;
* an official GroupMamba release file (a bare state dict, or one under ``model``,
  ``state_dict`` or ``model_ema``): tiny/small/base is recognised from the weights'
  shapes and the class count from the head;
* a timm model name with ``--teacher-checkpoint PATH`` (weights are never downloaded).

Its classes must be the student's: the same names in the same order when the
checkpoint names them, else (a bare state dict) a head with as many outputs as the
data has classes. Anything else is a ``TeacherError`` raised before training starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import ModelConfigError, check_model_name, create_model, is_groupmamba, load_pretrained
from models._helpers import classifier_names, clean_state_dict, unwrap_state_dict
from utils.checkpoint import (CheckpointError, INFERENCE_KEYS, check_checkpoint, choose_weights,
                              load_checkpoint, to_plain)
from utils.seed import preserved_rng

DISTILLATION_TYPES = ("none", "soft", "hard")
GROUPMAMBA_VARIANTS = ("groupmamba_tiny", "groupmamba_small", "groupmamba_base")


_SAME_CLASSES = ("a teacher must be trained on the student's classes (fine-tune it on this "
                 "data first, e.g. train.py --pretrained FILE, and use that run's best.pth)")


class TeacherError(CheckpointError):
    """A teacher that cannot be used (missing, unreadable, other classes); says why."""


# ------------------------------------------------------------------------ the loss

def distillation_term(student: torch.Tensor, teacher: torch.Tensor, kind: str,
                      tau: float = 1.0) -> torch.Tensor:
    """DeiT's distillation term for student logits ``(B, C)`` against teacher logits
    ``(B, C)`` (computed in float32). ``soft``: temperature-``tau`` KL divergence,
    summed and divided by ``B * C``, times ``tau ** 2``; ``hard``: cross-entropy
    against the teacher's top-1 class."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ in shape")
    student, teacher = student.float(), teacher.float()
    if kind == "soft":
        return F.kl_div(F.log_softmax(student / tau, dim=1),
                        F.log_softmax(teacher / tau, dim=1),
                        reduction="sum", log_target=True) * (tau * tau) / student.numel()
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    raise ValueError(f"distillation type must be soft or hard, not {kind!r}")


def _mean_of_heads(outputs) -> torch.Tensor:
    if isinstance(outputs, (tuple, list)):
        return torch.stack(tuple(outputs)).mean(0)
    return outputs


class DistillationLoss:
    """``loss = criterion(head, targets) * (1 - alpha) + distill(dist_head, teacher) * alpha``.

    Called as ``loss_fn(images, outputs, targets)`` with the student's ``outputs``
    (``(head_logits, dist_logits)`` or one tensor, see the module doc); runs the
    teacher on ``images`` itself.
    """

    def __init__(self, criterion: Callable, teacher: nn.Module, kind: str,
                 alpha: float = 0.5, tau: float = 1.0):
        if kind not in ("soft", "hard"):
            raise ValueError(f"distillation type must be soft or hard, not {kind!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], not {alpha}")
        if not tau > 0:
            raise ValueError(f"distillation tau must be positive, not {tau}")
        self.criterion, self.teacher = criterion, teacher
        self.kind, self.alpha, self.tau = kind, float(alpha), float(tau)
        teacher.eval()
        teacher.requires_grad_(False)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.teacher.training:  # nothing should switch it back, but never train BN stats
            self.teacher.eval()
        with torch.no_grad():
            return _mean_of_heads(self.teacher(images)).detach()

    def __call__(self, images: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):
            if len(outputs) != 2:
                raise ValueError(f"a distilled student returns (head, dist_head) logits, "
                                 f"got {len(outputs)} outputs")
            head, dist = outputs
        else:
            head = dist = outputs
        base = self.criterion(head, targets)
        distill = distillation_term(dist, self.teacher_logits(images), self.kind, self.tau)
        return base * (1.0 - self.alpha) + distill * self.alpha

    def __repr__(self) -> str:
        return (f"DistillationLoss({self.kind}, alpha={self.alpha}, tau={self.tau}, "
                f"teacher={type(self.teacher).__name__})")


# ------------------------------------------------------------------------ the teacher

@dataclass
class TeacherSource:
    """What --teacher/--teacher-checkpoint name, checked before any data is read."""
    kind: str                   # "checkpoint" (ours or official, one file) or "timm"
    path: Path
    model_name: Optional[str] = None


@dataclass
class Teacher:
    model: nn.Module
    info: dict                  # plain values, recorded in args.json and checkpoints
    notes: list[str] = field(default_factory=list)  # warnings worth logging


def resolve_teacher_source(teacher: str, checkpoint: Optional[str] = None) -> TeacherSource:
    """Tell a teacher file from a timm model name; TeacherError when neither works."""
    path = Path(teacher)
    if path.is_dir() and (path / "best.pth").is_file():  # a run folder of train.py
        path = path / "best.pth"
    if checkpoint is not None:
        if path.is_file():
            raise TeacherError(f"--teacher {teacher} is a file; --teacher-checkpoint goes "
                               "with a model name (--teacher resnet18 --teacher-checkpoint "
                               "weights.pth)")
        _check_name(teacher)
        if not Path(checkpoint).is_file():
            raise TeacherError(f"--teacher-checkpoint file not found: {checkpoint}")
        return TeacherSource("timm", Path(checkpoint), teacher)
    if path.is_file():
        return TeacherSource("checkpoint", path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar") or os.sep in teacher:
        raise TeacherError(f"--teacher file not found: {teacher}")
    _check_name(teacher)
    raise TeacherError(f"--teacher {teacher} is a model name: give its trained weights with "
                       "--teacher-checkpoint PATH (weights are never downloaded), or pass "
                       "a checkpoint written by train.py as --teacher")


def _check_name(name: str) -> None:
    try:
        check_model_name(name)
    except ModelConfigError as exc:
        raise TeacherError(f"--teacher: {exc}") from exc


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_classes(names: Sequence[str], classes: Sequence[str], source: str) -> None:
    names, classes = list(names), list(classes)
    if names == classes:
        return
    if sorted(names) == sorted(classes):
        raise TeacherError(f"{source} was trained on the data's classes in another order; "
                           "distillation needs the same class order")
    only_teacher = [n for n in names if n not in classes]
    only_data = [c for c in classes if c not in names]
    raise TeacherError(
        f"{source} was trained on {len(names)} classes that are not the data's "
        f"{len(classes)}: only in the teacher {only_teacher[:5]}"
        f"{' ...' if len(only_teacher) > 5 else ''}, only in the data {only_data[:5]}"
        f"{' ...' if len(only_data) > 5 else ''}; {_SAME_CLASSES}")


def _check_head_size(model: nn.Module, state: Mapping[str, Any], num_classes: int,
                     source: str) -> None:
    """A state dict without class names: its classifier must have num_classes outputs."""
    own = model.state_dict()
    heads = tuple(n + "." for n in classifier_names(model))
    for key, value in state.items():
        if key.startswith(heads) and key in own and tuple(value.shape) != tuple(own[key].shape):
            raise TeacherError(
                f"{source}: the teacher's classifier has {value.shape[0]} outputs "
                f"({key} {tuple(value.shape)}) but the data has {num_classes} classes; "
                f"{_SAME_CLASSES}")


def _groupmamba_variant(state: Mapping[str, Any]) -> Optional[tuple[str, dict]]:
    """Which GroupMamba variant (and kwargs) a bare state dict is, from its shapes."""
    head = state.get("head.weight")
    if not isinstance(head, torch.Tensor) or head.dim() != 2:
        return None
    import timm
    kwargs = {"num_classes": int(head.shape[0]),
              "distillation": "dist_head.weight" in state}
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    for name in GROUPMAMBA_VARIANTS:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            return name, kwargs
    return None


def load_teacher(source: TeacherSource, class_names: Sequence[str],
                 scan_backend: Optional[str] = None) -> Teacher:
    """Build the teacher (CPU, eval mode, no grads) and check its classes."""
    path, classes = source.path, list(class_names)
    ckpt = load_checkpoint(path, purpose="a teacher")
    ours = "model_name" in ckpt and "model_kwargs" in ckpt
    names = ckpt.get("class_names") if isinstance(ckpt.get("class_names"), list) else None
    if source.kind == "checkpoint" and ours:
        missing = [k for k in INFERENCE_KEYS if k not in ckpt]
        if missing:
            raise TeacherError(f"{path} lacks {', '.join(missing)}")
        check_checkpoint(ckpt, path)
        _check_classes(ckpt["class_names"], classes, str(path))
        state, weights = choose_weights(ckpt, "auto", path)
        name, kwargs, kind = ckpt["model_name"], dict(ckpt["model_kwargs"]), "train.py checkpoint"
    else:
        if names is not None:
            _check_classes(names, classes, str(path))
        try:
            state = clean_state_dict(unwrap_state_dict(ckpt)[0])[0]
        except CheckpointError as exc:
            raise TeacherError(f"{path}: {exc}") from exc
        weights = "raw"
        if source.kind == "timm":
            name, kind = source.model_name, "timm model + checkpoint"
            if ours and ckpt["model_name"] == name:
                state, weights = choose_weights(ckpt, "auto", path)
                kwargs = dict(ckpt["model_kwargs"])
            else:
                kwargs = {"num_classes": len(classes)}
                if is_groupmamba(name):
                    kwargs["distillation"] = any(k.startswith("dist_head.") for k in state)
        else:
            found = _groupmamba_variant(state)
            if found is None:
                raise TeacherError(
                    f"cannot tell which model {path} holds (not a train.py checkpoint and not "
                    "a GroupMamba tiny/small/base state dict); name the architecture: "
                    f"--teacher <timm model name> --teacher-checkpoint {path}")
            (name, kwargs), kind = found, "GroupMamba state dict (official format)"
            if kwargs["num_classes"] != len(classes):
                raise TeacherError(f"{path} is a {name} with {kwargs['num_classes']} classes "
                                   f"but the data has {len(classes)}; {_SAME_CLASSES}")
    try:
        model = create_model(name, scan_backend=scan_backend, **kwargs)
    except ModelConfigError as exc:
        raise TeacherError(f"cannot build the teacher {name} of {path}: {exc}") from exc
    if names is None:
        _check_head_size(model, state, len(classes), str(path))
    try:
        load_pretrained(model, state, reset_head=False)
    except CheckpointError as exc:
        raise TeacherError(f"the weights in {path} do not fit the teacher {name}: {exc}") from exc
    out_features = _output_size(model, state)
    if out_features is not None and out_features != len(classes):
        raise TeacherError(f"{path}: the teacher predicts {out_features} classes but the "
                           f"data has {len(classes)}; {_SAME_CLASSES}")
    model.eval().requires_grad_(False)
    info = {"teacher": str(source.model_name or path), "kind": kind,
            "file": str(Path(path).resolve()), "sha256": file_sha256(path),
            "model_name": name, "model_kwargs": to_plain(kwargs), "weights": weights,
            "num_classes": len(classes), "class_names_checked": names is not None,
            "params": sum(p.numel() for p in model.parameters())}
    if ours:
        info.update(img_size=int(ckpt["img_size"]), mean=to_plain(ckpt["mean"]),
                    std=to_plain(ckpt["std"]), best_acc1=to_plain(ckpt.get("best_acc1")))
    return Teacher(model, info)


def _output_size(model: nn.Module, state: Mapping[str, Any]) -> Optional[int]:
    for name in classifier_names(model):
        weight = state.get(f"{name}.weight")
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
    return None


def setup_teacher(source: TeacherSource, class_names: Sequence[str], img_size: int,
                  mean: Sequence[float], std: Sequence[float], device: torch.device,
                  scan_backend: Optional[str] = None, data_parallel: bool = False) -> Teacher:
    """``load_teacher``, moved to ``device`` (DataParallel when the student is), with
    notes when the student's images differ from the teacher's training images. The
    random streams are left as they were: a run with a teacher starts from the same
    student weights as one without."""
    with preserved_rng():
        teacher = load_teacher(source, class_names, scan_backend)
    info = teacher.info
    if "img_size" in info and info["img_size"] != img_size:
        teacher.notes.append(f"the teacher was trained at {info['img_size']} px and will "
                             f"see the student's {img_size} px images")
    if "mean" in info and not _close(info["mean"] + info["std"], list(mean) + list(std)):
        teacher.notes.append(f"the teacher was trained with mean/std {info['mean']}/"
                             f"{info['std']} and will see images normalised with "
                             f"{list(mean)}/{list(std)}")
    teacher.model.to(device)
    if data_parallel:  # only to split the batch; no gradients, so nothing to synchronise
        teacher.model = nn.DataParallel(teacher.model)
    return teacher


def _close(a: Sequence[float], b: Sequence[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b))


def same_teacher_note(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any]) -> Optional[str]:
    """A warning when a resumed run's teacher file is not the one it started with."""
    if not saved or not saved.get("sha256") or saved.get("sha256") == current.get("sha256"):
        return None
    return (f"the teacher file {current.get('file')} is not the one this run started "
            f"with ({saved.get('file')}, sha256 {str(saved.get('sha256'))[:12]}...); "
            "training continues with the new one")


def check_teacher(teacher: Teacher, config, evaluate: Callable[[nn.Module], dict],
                  saved_info: Optional[Mapping[str, Any]], student_kwargs: Mapping[str, Any]) -> None:
    """Log how the teacher is used and its accuracy on val (``evaluate(model)``, a check
    that it fits the data); the accuracy is recorded in ``teacher.info``."""
    log = logging.getLogger("train")
    note = same_teacher_note(saved_info, teacher.info)
    for line in teacher.notes + ([note] if note else []):
        log.warning("teacher: %s", line)
    with preserved_rng():  # a loader draws its seed from the RNG; keep the run's stream
        accuracy = evaluate(teacher.model)["acc1"]
    teacher.info["val_acc1"] = accuracy
    info = teacher.info
    log.info("teacher: %s from %s (%s, %s weights, %.2f M params), val ACC1 %.2f %%; %s", info["model_name"],
             info["file"], info["kind"], info["weights"], info["params"] / 1e6, accuracy,
             describe(config.distillation_type, config.distillation_alpha, config.distillation_tau, student_kwargs))


def describe(kind: str, alpha: float, tau: float, student_kwargs: Mapping[str, Any]) -> str:
    """One log line on how the distillation term is applied to this student."""
    two_heads = bool(student_kwargs.get("distillation"))
    where = ("head on the labels, dist_head on the teacher" if two_heads else
             "the student has one head: it gets both the label and the teacher term")
    return (f"distillation {kind} (alpha {alpha}" + (f", tau {tau}" if kind == "soft" else "")
            + f"): {where}")
