"""train.py's settings: the parser, the presets, the checks, and the resolved configuration.

:func:`parse_config` reads the command line once and returns a :class:`Config`, which
is read-only: every later step reads it and none changes it. Precedence, lowest first:
the defaults, a ``--preset``, the arguments saved in a ``--resume`` checkpoint, the
flags typed on the command line. The scan backend is chosen the same way everywhere
(:func:`choose_scan_backend`): ``--scan-backend``, else the ``GROUPMAMBA_SCAN_BACKEND``
environment variable, else ``auto``.
"""
from __future__ import annotations

import argparse
import math
import os
import types
from pathlib import Path
from typing import Mapping, Optional

from kernels.grid_scan import SCAN_BACKENDS
from models import ModelConfigError, check_model_name, is_groupmamba
from utils.amp import AMP_MODES
from utils.checkpoint import RESUME_KEYS, CheckpointError, load_checkpoint
from utils.compile_cache import DEFAULT_COMPILE_CACHE
from utils.cpu import plan_cpu
from utils.datasets import CHECK_MODES
from utils.distillation import DISTILLATION_TYPES
from utils.gpu_data import GPU_DATA_MODES
from utils.tensorboard_log import tensorboard_missing
from utils.transforms import check_augment

SCAN_BACKEND_ENV = "GROUPMAMBA_SCAN_BACKEND"

# Recipes: defaults that a preset changes; flags typed on the command line still win.
PRESETS = {
    # a check that everything works, in about a minute on a 2-core CPU: small images, two
    # short epochs (bench/RESULTS.md); the final report still covers all of val
    "quick": {"img_size": 64, "epochs": 2, "batch_size": 32, "warmup_epochs": 0.0,
              "max_train_batches": 12, "max_val_batches": 4},
    # the short-schedule recipe for one GPU, tuned on the plant-seedlings val split for
    # the best model within 300 s (bench/RESULTS.md, 2026-11-28 entries): 192 px,
    # batch 64 at lr 5e-4, random transposes (photos taken from above have no "up"),
    # checkpoints every 10 epochs (compiling, CUDA graphs and GPU-resident data are the
    # GPU defaults anyway)
    "fast": {"img_size": 192, "batch_size": 64, "epochs": 130, "lr": 5e-4,
             "val_batch_size": 256, "warmup_epochs": 3.0, "transpose": 0.5, "gpu_data": "auto",
             "save_every": 10, "workers": 16},
}
# saved arguments that a resumed run does not inherit (the scan backend, threads and compile
# cache are the machine's; the workers are inherited: they decide which random numbers
# augment which image)
NOT_INHERITED = {"resume", "output", "force", "pretrained", "scan_backend", "threads", "compile_cache"}
SWITCH = ("auto", "on", "off")

EXAMPLES = """examples:
  python train.py --preset quick              a check on a CPU: 64 px, two short epochs
  python train.py --preset fast               the short recipe for one GPU
  python makedata.py --src my_images --dst my_data && \\
  python train.py --data my_data --epochs 50  your own images, one folder per class
"""


class Config(types.SimpleNamespace):
    """The resolved settings of a run; read-only (``vars(config)`` gives a dict)."""

    def __setattr__(self, name, value):
        raise AttributeError(f"the configuration is read-only once resolved (tried to set {name!r})")

    __delattr__ = __setattr__


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except "None" (those helps say what unset means); the
    epilog's examples as written."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def choose_scan_backend(flag: Optional[str], environ: Mapping[str, str] = os.environ) -> str:
    """``--scan-backend`` when given, else ``$GROUPMAMBA_SCAN_BACKEND``, else ``auto``."""
    if flag:
        return flag
    value = environ.get(SCAN_BACKEND_ENV, "").strip().lower()
    if value and value not in SCAN_BACKENDS:
        raise ValueError(f"{SCAN_BACKEND_ENV}={value!r}: expected one of {', '.join(SCAN_BACKENDS)}")
    return value or "auto"


def add_speed_arguments(parser: argparse.ArgumentParser, switch_default: str = "auto") -> argparse._ArgumentGroup:
    """The speed options, with the same names and meaning in train.py and the benchmarks
    (a benchmark measures what it is asked: its switches default to off)."""
    g = parser.add_argument_group("speed")
    g.add_argument("--scan-backend", choices=SCAN_BACKENDS, default=None,
                   help="the selective scan: auto (the grid scan on a GPU, pure PyTorch on a CPU), "
                        "grid (fused Triton kernels that read each channel group's order in place), "
                        "triton, cuda (the optional compiled extension) or torch; unset: "
                        f"${SCAN_BACKEND_ENV}, else auto")
    g.add_argument("--compile", choices=SWITCH, nargs="?", const="on", default=switch_default,
                   help="torch.compile each block in place (regional compilation): faster steps after a "
                        "first epoch spent compiling; auto: compile a GroupMamba on a GPU when the run is "
                        "long enough to win back the compile time (the log says why); --compile alone: on")
    g.add_argument("--cuda-graph", choices=SWITCH, nargs="?", const="on", default=switch_default,
                   help="replay each training step and validation forward from a CUDA graph (one GPU, one "
                        "process, bf16 or fp32); auto: on for a GroupMamba where it can run; "
                        "--cuda-graph alone: on")
    g.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="where compiled graphs and kernels are kept between runs (unset: "
                        f"$TORCHINDUCTOR_CACHE_DIR, else {DEFAULT_COMPILE_CACHE})")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only each block's input and recompute its activations in the backward: "
                        "less than half the training memory for about a quarter more time per step "
                        "(GroupMamba on a CPU); unset: on for a CPU when a training step may not fit "
                        "in memory without it, else off")
    g.add_argument("--low-memory", action="store_true",
                   help="GroupMamba on a GPU: its fused kernels also without a CUDA graph (with one "
                        "they are on anyway) and, with --compile, a lower activation memory budget: "
                        "40-45 %% less training memory for 10-25 %% of the speed")
    return g


def _data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="folder with train/<class>/ and val/<class>/ inside")
    g.add_argument("--stats", default="stats.json",
                   help="mean/std file from mean_std.py (ImageNet's when missing)")
    g.add_argument("--img-size", type=int, default=224, help="square input size (px)")
    g.add_argument("--workers", type=int, default=None,
                   help="data-loading processes per training process (unset: on a CPU none up to 2 free "
                        "cores, else a quarter of them, at most 4; on a GPU up to 4)")
    g.add_argument("--threads", type=int, default=None,
                   help="PyTorch threads per training process (unset: $OMP_NUM_THREADS, else on a CPU the "
                        "cores idle at start-up less the workers, on a GPU PyTorch's default; the log says)")
    g.add_argument("--check-images", choices=CHECK_MODES, default="full",
                   help="before training, decode every image (full), open only its header, or "
                        "not check; unreadable files are skipped with a warning whenever they are found")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="groupmamba_tiny",
                   help="groupmamba_tiny/small/base or any timm model name")
    g.add_argument("--pretrained", default=None, metavar="PATH",
                   help="start from these weights (an official release file or a checkpoint of "
                        "ours; unset: random); the head is re-initialised when the class count differs")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")


def _schedule_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a recipe of defaults: quick (a CPU check in minutes) or fast (one GPU, "
                        "short schedule); flags you give still win")
    g.add_argument("--epochs", type=int, default=100, help="epochs to train in all")
    g.add_argument("--batch-size", type=int, default=64,
                   help="per process under torchrun; the total under DataParallel")
    g.add_argument("--val-batch-size", type=int, default=None,
                   help="batch size of validation and of the final report (unset: --batch-size)")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay (not on biases and norm weights)")
    g.add_argument("--warmup-epochs", type=float, default=5.0,
                   help="linear warm-up length (may be fractional; capped at half the run)")
    g.add_argument("--clip-grad", type=float, default=5.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.9998,
                   help="largest decay of the weights' moving average (0: no EMA)")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of weights, shuffling and augmentation (rank r: seed + r)")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the epoch that passes this much wall time since the first "
                        "step (unset: no limit)")
    g.add_argument("--fit-time-limit", action=argparse.BooleanOptionalAction, default=False,
                   help="with --time-limit: shorten --epochs to what fits into the limit at the "
                        "speed measured so far, so the learning rate decays fully in time")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None,
                   help="run folder (unset: runs/<YYYYmmdd-HHMMSS>, or the --resume checkpoint's folder)")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue from a last.pth (or the folder holding it)")
    g.add_argument("--force", action="store_true",
                   help="write into a non-empty --output, replacing train.py's files there (never those of "
                        "a run still training there)")
    g.add_argument("--save-every", type=int, default=1, metavar="N",
                   help="write last.pth and curves.png every N epochs and at the end")
    g.add_argument("--save-safetensors", action="store_true",
                   help="also write best.safetensors: best.pth's weights and description (test.py reads it)")
    g.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="when the output is not a terminal (a file, a pipe, a job's log): log the epoch's "
                        "progress (steps done, images a second, time left) at least this often; a terminal "
                        "shows a bar")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the per-epoch loss, accuracy and learning rate for TensorBoard into "
                        "<output>/tensorboard (needs pip install tensorboard)")


def _augmentation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--vflip", type=float, default=0.5, help="vertical flip probability")
    g.add_argument("--transpose", type=float, default=0.0,
                   help="probability of swapping height and width; 0.5 with both flips at 0.5 makes "
                        "all eight 90-degree rotations and reflections equally likely")
    g.add_argument("--cutout", type=float, default=0.5, help="Cutout (RandomErasing) probability")
    g.add_argument("--scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="random resized crop: area fraction range (unset: plain resize)")
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], metavar=("LO", "HI"),
                   help="random resized crop: aspect ratio range")
    g.add_argument("--rotate", type=float, default=0.0, help="random rotation up to this many degrees")
    g.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=0.1, help="probability of mixing a batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="probability of CutMix instead of Mixup when both are on")
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"), default="batch",
                   help="one mixing factor per batch, per pair or per image")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")


def _distillation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation (DeiT's recipe, as in the GroupMamba paper)")
    g.add_argument("--teacher", default=None, metavar="CKPT|NAME",
                   help="a checkpoint written by train.py, an official GroupMamba release file, or "
                        "a timm model name with --teacher-checkpoint; trained on the data's classes")
    g.add_argument("--teacher-checkpoint", default=None, metavar="PATH",
                   help="weights of a --teacher given by timm model name")
    g.add_argument("--distillation-type", choices=DISTILLATION_TYPES, default="none",
                   help="hard: cross-entropy to the teacher's top-1 class; soft: KL divergence to "
                        "its softened predictions; none: no teacher")
    g.add_argument("--distillation-alpha", type=float, default=0.5,
                   help="weight of the teacher term; the label term gets 1 - alpha")
    g.add_argument("--distillation-tau", type=float, default=1.0, help="temperature of soft distillation")


def _speed_and_expert_arguments(p: argparse.ArgumentParser) -> None:
    g = add_speed_arguments(p)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available")
    g.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="mixed precision; auto: bf16 on a GPU that supports it, else off")
    g.add_argument("--gpu-data", choices=GPU_DATA_MODES, default="auto",
                   help="decode every image once and keep them on the device, augmenting there in "
                        "batches; auto: on for CUDA when they take < 25 %% of free GPU memory")
    g = p.add_argument_group("expert")
    g.add_argument("--max-train-batches", type=int, default=None,
                   help="at most this many training batches per epoch (unset: all)")
    g.add_argument("--max-val-batches", type=int, default=None,
                   help="at most this many batches per validation pass, from a fixed shuffled "
                        "order (unset: all; the final report always uses all of val)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=_HelpFormatter, epilog=EXAMPLES,
        description="Train a GroupMamba (or any timm) image classifier on <data>/train/<class>/\n"
                    "and validate on <data>/val/<class>/ (makedata.py writes that layout).")
    for add in (_data_arguments, _model_arguments, _schedule_arguments, _output_arguments,
                _augmentation_arguments, _distillation_arguments, _speed_and_expert_arguments):
        add(p)
    return p


def explicit_options(parser: argparse.ArgumentParser, argv) -> dict:
    """The options typed on the command line (defaults left out)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default


def mixup_active(c) -> bool:
    return (c.mixup > 0 or c.cutmix > 0) and c.mixup_prob > 0


def memory_hint(c) -> str:
    """What to change when a run of ``c`` runs out of memory (the end of a one-line error)."""
    low_memory = " or add --low-memory" if is_groupmamba(c.model) and not c.low_memory else ""
    return (f"the run used --batch-size {c.batch_size} (--val-batch-size {c.val_batch_size}) at "
            f"{c.img_size} px; lower --batch-size{low_memory}")


def _problems(c) -> list[str]:
    """What is wrong with a set of values, one message each."""
    out = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            out.append(msg)

    try:
        check_model_name(c.model)
    except ModelConfigError as exc:
        need(False, str(exc))
    need(c.pretrained is None or Path(c.pretrained).is_file(), f"--pretrained file not found: {c.pretrained}")
    for name, low in (("epochs", 1), ("save_every", 1), ("batch_size", 1), ("img_size", 16), ("workers", 0)):
        need(getattr(c, name) >= low, f"--{name.replace('_', '-')} must be at least {low}")
    for name in ("val_batch_size", "max_train_batches", "max_val_batches"):
        need(getattr(c, name) is None or getattr(c, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    need(c.time_limit is None or c.time_limit > 0, "--time-limit must be positive")
    need(c.progress_every > 0, "--progress-every must be positive")
    need(not c.fit_time_limit or c.time_limit is not None, "--fit-time-limit needs --time-limit SECONDS")
    try:
        check_augment(c.scale, c.ratio, c.rotate)
    except ValueError as exc:
        need(False, str(exc))
    need(c.lr > 0 and math.isfinite(c.lr), "--lr must be a positive number")
    for name in ("min_lr", "weight_decay", "warmup_epochs", "clip_grad", "mixup", "cutmix"):
        need(getattr(c, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
    need(0 <= c.ema_decay < 1, "--ema-decay must be in [0, 1) (0 disables EMA)")
    need(0 <= c.drop_path < 1, "--drop-path must be in [0, 1)")
    need(0 <= c.smoothing < 1, "--smoothing must be in [0, 1)")
    for name in ("hflip", "vflip", "transpose", "cutout", "mixup_prob", "mixup_switch_prob", "distillation_alpha"):
        need(0 <= getattr(c, name) <= 1, f"--{name.replace('_', '-')} must be in [0, 1]")
    need(not c.tensorboard or tensorboard_missing() is None, tensorboard_missing() or "")
    need(not c.low_memory or is_groupmamba(c.model),
         f"--low-memory applies to GroupMamba models only, not --model {c.model}")
    need(not mixup_active(c) or c.batch_size % 2 == 0,
         "Mixup/CutMix needs an even --batch-size (or turn them off with --mixup 0 --cutmix 0)")
    out += _distillation_problems(c)
    return out


def _distillation_problems(c) -> list[str]:
    if c.distillation_type == "none" and c.teacher is not None:
        return ["--teacher is given but --distillation-type is none; choose --distillation-type hard "
                "(DeiT's best) or soft"]
    if c.distillation_type != "none" and c.teacher is None:
        return [f"--distillation-type {c.distillation_type} needs a --teacher (a checkpoint written by "
                "train.py, an official GroupMamba release file, or a timm model name with "
                "--teacher-checkpoint)"]
    if c.teacher_checkpoint is not None and c.teacher is None:
        return ["--teacher-checkpoint needs --teacher <timm model name>"]
    if not (c.distillation_tau > 0 and math.isfinite(c.distillation_tau)):
        return ["--distillation-tau must be a positive number"]
    return []


def _read_resume(parser: argparse.ArgumentParser, resume: str) -> tuple[Path, dict]:
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pth"
    try:
        ckpt = load_checkpoint(path, RESUME_KEYS, "--resume")
    except CheckpointError as exc:
        parser.error(str(exc))
    if ckpt.get("optimizer") is None:
        parser.error(f"{path} has no optimizer state (best.pth is for inference); resume from last.pth")
    return path, ckpt


def parse_config(argv=None) -> tuple[Config, Optional[dict]]:
    """The resolved configuration, and the ``--resume`` checkpoint (None without one)."""
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    explicit = explicit_options(parser, argv)
    resume_ckpt = None
    if values["resume"]:
        path, resume_ckpt = _read_resume(parser, values["resume"])
        saved = resume_ckpt["args"]
        if "model" in explicit and explicit["model"] != saved.get("model"):
            parser.error(f"--model {explicit['model']} differs from the checkpoint's {saved.get('model')}; "
                         "a resumed run keeps its model")
        values.update({k: v for k, v in saved.items() if k in values and k not in NOT_INHERITED})
        for name in ("compile", "cuda_graph"):  # older runs saved these as true/false
            values[name] = {True: "on", False: "off"}.get(values[name], values[name])
    preset = explicit.get("preset") if resume_ckpt else values.get("preset")
    if preset:
        values.update(PRESETS[preset])
    values.update(explicit)
    if resume_ckpt is not None:
        values["resume"] = str(path)  # the file, also when a folder was given
        if explicit.get("distillation_type") == "none" and "teacher" not in explicit:
            values["teacher"] = values["teacher_checkpoint"] = None  # drop the saved teacher
    if values.get("val_batch_size") is None:  # unset, or absent from an older run's arguments
        values["val_batch_size"] = values["batch_size"]
    try:
        values["scan_backend"] = choose_scan_backend(values["scan_backend"])
        cpu = plan_cpu(values["device"], values["threads"], values["workers"])
    except ValueError as exc:
        parser.error(str(exc))
    values.update(threads=cpu.threads, workers=cpu.workers, cpu_plan=cpu.describe())
    config = Config(**values)
    problems = _problems(config)
    if problems:
        parser.error("; ".join(problems))
    return config, resume_ckpt
