"""Train an image classifier (GroupMamba by default, any timm model by name) on
``<data>/train/<class>/...`` and validate on ``<data>/val/<class>/...``.

Quick start (CPU is fine; see --preset quick below)::

    python mean_std.py                 # -> stats.json (mean/std of your images)
    python makedata.py                 # -> data/train/<class>, data/val/<class>
    python train.py --preset quick     # a short check that everything works
    python train.py                    # the real run: groupmamba_tiny, 224 px, 100 epochs
    python test.py --checkpoint runs/<time>/best.pth --images data/val

What one run does
-----------------
* Classes (names and count) come from the class folders; train and val must list the
  same classes. Missing folders, empty classes or differing class lists stop the run
  before training. Unreadable images are skipped with a warning and listed in
  ``skipped_images.txt`` (see ``--check-images``).
* Augmentation: resize to --img-size (or, with --scale, a random resized crop; with
  --rotate, a random rotation), horizontal/vertical flips, Cutout
  (torchvision RandomErasing, p=0.5, scale=(0.02, 0.4), ratio=(0.4, 2.5), random
  fill), normalisation with stats.json's mean/std (ImageNet's when absent), then
  Mixup/CutMix through timm's ``Mixup`` (the tutorial's values: mixup 0.8, cutmix 1.0,
  prob 0.1, switch prob 0.5, batch mode, label smoothing 0.1) with
  ``SoftTargetCrossEntropy``; with Mixup off, ``LabelSmoothingCrossEntropy``. The last
  incomplete training batch is dropped (batch-mode Mixup needs an even batch).
* Small data sets on the GPU (--gpu-data, utils/gpu_data.py): every image decoded
  once, kept as uint8 on the device and augmented there in batches with the same
  recipe and shuffle. auto (the default): on for CUDA when the images take < 25 % of
  free GPU memory, off on CPU; ``on`` works on any device. args.json's
  ``run.data_path`` says which path ran.
* AdamW, cosine learning rate with linear warm-up stepped every iteration, gradient
  clipping (--clip-grad), mixed precision (--amp: bf16 on a GPU that has it, off on
  CPU; fp16 uses a GradScaler).
* EMA of the weights (timm ModelEmaV3, via utils.ema). Its decay at optimizer step t is
  ``min(--ema-decay, 1 - (1 + t) ** -0.75)``, so on a small data set (a few thousand
  steps) the average follows the last ~10 % of training instead of being dominated
  by the random initial weights, and on long runs it reaches --ema-decay. Raw and EMA
  weights are both validated each epoch; ``best.pth`` is taken on the better of the
  two and records which (``best_source``).
* Several GPUs: DataParallel when more than one GPU is visible (--batch-size is the
  total); ``torchrun --nproc_per_node=N train.py ...`` for DistributedDataParallel
  (NCCL on GPUs, Gloo with --device cpu; --batch-size is per process).
* A NaN/inf loss stops the run with a message naming the epoch and step (exit code
  1); the last checkpoint written stays as it was.
* Distillation (the GroupMamba paper's objective, DeiT's recipe): with
  ``--teacher best.pth --distillation-type hard`` the student's ``head`` learns the
  labels and its ``dist_head`` the teacher's top-1 class (``soft``: the teacher's
  temperature-softened probabilities); loss = (1 - alpha) * label loss + alpha *
  teacher loss. The teacher (a checkpoint of ours, an official GroupMamba release file,
  or a timm name with --teacher-checkpoint) runs in eval mode without gradients on the
  same, already mixed, batch; its classes must be the data's, checked before training.
  Its val ACC1 is logged at the start. A student with one head (a timm CNN,
  GroupMamba with distillation=False) gets both terms on that head. Without a teacher
  GroupMamba's two heads both learn the labels. See utils/distillation.py.

Files written in --output (default runs/<YYYYmmdd-HHMMSS>)
----------------------------------------------------------
``args.json``            the final arguments (after --preset/--resume) and run facts
``train.log``            the log printed on the console
``metrics.csv``          one row per epoch: lr, train loss/ACC1/ACC5, val and EMA-val
                         loss/ACC1/ACC5 (accuracies in percent), best so far, speed,
                         elapsed_s (wall seconds since the first step)
``curves.png``           loss and top-1 accuracy curves
``last.pth``             everything needed to --resume (every --save-every epochs)
``best.pth``             the best weights (raw and EMA) and what test.py needs
``report.txt/.json``     per-class precision/recall/F1 on val, with best.pth's weights
``confusion_matrix.png`` confusion matrix on val, with best.pth's weights
``skipped_images.txt``   only when some files could not be read

Checkpoints are written atomically and load with ``torch.load(path,
weights_only=True)``. An existing non-empty --output is refused unless --resume
points into it or --force is given (--force replaces only the file names above).

Presets (--preset) change defaults only; flags given on the command line win.
``fast``: the one-GPU short-schedule recipe of issue 5 (192 px, batch 64, lr 5e-4,
3 warm-up epochs, 130 epochs, random transposes, validation in batches of 256,
GPU-resident data, --compile and --cuda-graph, last.pth every 10 epochs); on one
H200, with --time-limit 300 --fit-time-limit, it reached 94.4 % val ACC1 within 300 s
with inductor's cache cold (compiling included) and 94.6-95.9 % (95 % after 254 s in
the best of four runs) with it warm (bench/RESULTS.md).
``quick``: 64 px images, 2 epochs of at most 40 batches of 32, at most 10 validation
batches per pass (a fixed shuffled subset), no warm-up. On the 2-core CPU machine
the whole quick start (makedata, mean_std, this training with groupmamba_tiny on
data1's split, and the report on all 1,206 val images) took 5 min 26 s, with other
jobs sharing the CPU (about 1.5 min per epoch when alone); it leaves a checkpoint,
curves and a report. The accuracy (about 30 %) means nothing: it only shows that
the pipeline works.

--resume PATH (a last.pth or its folder) continues where the run stopped: model,
EMA, optimizer, scaler, scheduler, epoch, best metric, history and RNG state. The
saved arguments are reused; flags given again override them (e.g. --epochs 200 to
train longer; the cosine is stretched over the new length). Output goes to the
checkpoint's folder unless --output is given.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import sys
import time

PROCESS_START = time.perf_counter()  # before the heavy imports, for the start-up log line

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch._functorch.config as functorch_config  # noqa: E402
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from utils.ema import ModelEma
from torch.utils.data import DataLoader, DistributedSampler

from kernels.selective_scan import resolve_backend
from utils.amp import AMP_MODES, Precision, resolve_amp
from utils.cuda_graphs import CapturedForward, CapturedTrainStep, cuda_graph_problem
from utils.checkpoint import (RESUME_KEYS, FORMAT, CheckpointError, load_checkpoint,
                              save_checkpoint, to_cpu, to_plain)
from utils.datasets import CHECK_MODES, DatasetError, ImageDataset, load_train_val
from utils.distillation import (DISTILLATION_TYPES, DistillationLoss, describe,
                                resolve_teacher_source, same_teacher_note, setup_teacher)
from utils.distributed import (DistEnv, ShardSampler, barrier, broadcast_object,
                               cleanup_distributed, run_on_main, setup_distributed,
                               unwrap_model, wrap_model)
from utils.engine import (NonFiniteLossError, heads_loss, predict_batches, train_one_epoch,
                          validate)
from utils.gpu_data import (GPU_DATA_MODES, GpuLoader, build_gpu_loaders, choose_gpu_data,
                            decoded_bytes, full_eval_loader)
from utils.images import atomic_write_json, atomic_write_text
from utils.metrics import classification_report_files, write_csv
from utils.modeling import (SCAN_BACKENDS, ModelConfigError, check_model_name, compile_blocks,
                            compile_seconds, create_model, describe_compile_seconds,
                            describe_model, is_groupmamba, load_pretrained, model_kwargs_for,
                            set_scan_backend)
from utils.optim import build_optimizer, build_scheduler, set_schedule_length
from utils.plots import plot_confusion_matrix, plot_curves
from utils.seed import get_rng_state, preserved_rng, seed_everything, set_rng_state
from utils.transforms import check_augment, eval_transform, load_stats, train_transform

log = logging.getLogger("train")

PRESETS = {
    "quick": {"img_size": 64, "epochs": 2, "batch_size": 32, "warmup_epochs": 0.0,
              "max_train_batches": 40, "max_val_batches": 10},
    # time-to-accuracy recipe for one GPU (issue 5; figures in bench/RESULTS.md):
    # 192 px (on an H200 with a warm compile cache: 95.17 % mean best val ACC1 within
    # 300 s over five runs, 160 px: 94.80 % over three), GPU-resident data, the
    # tutorial's augmentation plus random transposes (top-down plant photos have no
    # "up"; heavier crops and rotations learned more slowly in short runs), batch 64
    # at lr 5e-4 (twice the optimizer steps of batch 128; better than 128 at 1e-3 or
    # 5e-4 and than 64 at 3e-4 or 7e-4 on the val split), a short warm-up, validation
    # in batches of 256, regional compilation and CUDA graphs (~2.5x the eager speed;
    # compiling costs ~2 minutes of the first epoch on a cold cache, ~30 s on a warm
    # one), checkpoints every 10 epochs. An epoch takes ~2.5 s on an H200;
    # bench/time_to_accuracy.py adds --time-limit 300 --fit-time-limit, which ends the
    # 130-epoch cosine early enough to finish within the limit
    "fast": {"img_size": 192, "batch_size": 64, "epochs": 130, "lr": 5e-4,
             "val_batch_size": 256, "warmup_epochs": 3.0, "transpose": 0.5, "gpu_data": "auto",
             "save_every": 10, "workers": 16, "compile": True, "cuda_graph": True},
}
# saved arguments that a resumed run does not inherit
NOT_INHERITED = {"resume", "output", "force", "pretrained"}
OUTPUT_FILES = ("args.json", "train.log", "metrics.csv", "curves.png", "last.pth",
                "best.pth", "report.txt", "report.json", "confusion_matrix.png",
                "skipped_images.txt")
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc1", "train_acc5", "val_loss",
                 "val_acc1", "val_acc5", "ema_val_loss", "ema_val_acc1", "ema_val_acc5",
                 "best_acc1", "best_epoch", "best_source", "train_img_s", "epoch_time_s",
                 "elapsed_s", "grad_norm")


# ------------------------------------------------------------------------ arguments

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except "None" (those helps say what unset means)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a GroupMamba (or any timm) image classifier on "
                    "<data>/train and <data>/val class folders.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="folder with train/ and val/ inside")
    g.add_argument("--stats", default="stats.json",
                   help="mean/std file from mean_std.py (ImageNet's when missing)")
    g.add_argument("--img-size", type=int, default=224, help="square input size (px)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading processes (per training process)")
    g.add_argument("--check-images", choices=CHECK_MODES, default="full",
                   help="before training, decode every image (full), open only its "
                        "header, or not check; unreadable files are skipped with a warning")
    g.add_argument("--max-train-batches", type=int, default=None,
                   help="at most this many training batches per epoch (unset: all)")
    g.add_argument("--max-val-batches", type=int, default=None,
                   help="at most this many batches per validation pass, from a fixed "
                        "shuffled order so all classes are seen (unset: all; the final "
                        "report always uses all of val)")
    g.add_argument("--gpu-data", choices=GPU_DATA_MODES, default="auto",
                   help="decode every image once and keep them (uint8) on the device, "
                        "augmenting there in batches (utils/gpu_data.py); auto: on for "
                        "CUDA when they take < 25 %% of free GPU memory; on: any device")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="groupmamba_tiny",
                   help="groupmamba_tiny/small/base or any timm model name")
    g.add_argument("--pretrained", default=None, metavar="PATH",
                   help="start from these weights (official release file or a "
                        "checkpoint of ours; unset: random); the head is re-initialised "
                        "when the class count differs")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--scan-backend", choices=SCAN_BACKENDS, default="auto",
                   help="GroupMamba selective-scan implementation (also exported as "
                        "GROUPMAMBA_SCAN_BACKEND); with auto or triton on CUDA the model's layers "
                        "run the fused channels-last grid scan (kernels/grid_scan), cuda runs the "
                        "compiled extension on sequences gathered into scan order")
    g.add_argument("--fused-dwconv", action="store_true",
                   help="GroupMamba on CUDA: the depth-wise convs as fused Triton kernels whose "
                        "backward recomputes them (same numerics); on an H200, groupmamba_tiny "
                        "at batch 128 peaked at 11.2 instead of 16.8 GiB but trained ~5 %% slower")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile each block of the model and of its EMA in place "
                        "(regional compilation, static shapes; fuses LayerNorms, gating and "
                        "layout copies); compiling takes 1-2 minutes of the first epoch "
                        "(less when inductor's cache is warm). Pair it with --cuda-graph")
    g.add_argument("--memory-budget", type=float, default=1.0,
                   help="with --compile: the compiler's activation memory budget (0-1]; below 1 "
                        "its partitioner recomputes cheap activations in the backward instead "
                        "of keeping them (same numerics). On an H200, groupmamba_tiny at batch "
                        "128 with --fused-dwconv and 0.9 peaked at 8.5 instead of 11.2 GiB "
                        "for 0.5 %% more GPU time")
    g.add_argument("--pad-matmuls", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile: pad every matmul to sizes that are multiples of 8 "
                        "(GroupMamba-T's 348-channel stage 3 then gets fast GEMM kernels: "
                        "+4.6 %% training speed on an H200, same accuracy; bench/RESULTS.md, "
                        "eleventh session)")
    g.add_argument("--compile-stage-norms", action="store_true",
                   help="with --compile, EXPERIMENTAL: compile the LayerNorms between "
                        "GroupMamba's stages too (else eager float32); not with --cuda-graph: "
                        "training runs with both diverged (bench/RESULTS.md, eleventh session)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="capture the training step (forward to optimizer step) and the "
                        "validation forwards in CUDA graphs and replay them: one launch "
                        "per step instead of thousands (one GPU, one process, bf16 or "
                        "fp32; a NaN loss is then caught after the optimizer step)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="epochs to train in all")
    g.add_argument("--batch-size", type=int, default=64,
                   help="per process under torchrun; the total under DataParallel")
    g.add_argument("--val-batch-size", type=int, default=None,
                   help="batch size of validation and of the final report (default: "
                        "--batch-size; larger batches evaluate faster)")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay (not on biases and norm weights)")
    g.add_argument("--warmup-epochs", type=float, default=5.0,
                   help="linear warm-up length (may be fractional; capped at half "
                        "the run)")
    g.add_argument("--clip-grad", type=float, default=5.0,
                   help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="mixed precision; auto: bf16 on a GPU that supports it, else off")
    g.add_argument("--ema-decay", type=float, default=0.9998,
                   help="largest EMA decay (reached gradually, see the module doc); "
                        "0 disables EMA")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of weights, shuffling and augmentation (rank r: seed + r)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available")

    g = p.add_argument_group("augmentation")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--vflip", type=float, default=0.5, help="vertical flip probability")
    g.add_argument("--transpose", type=float, default=0.0,
                   help="probability of swapping height and width; at 0.5 with both flips "
                        "at 0.5, all eight 90-degree rotations and reflections are equally "
                        "likely (for images without an up: plants from above, cells, ...)")
    g.add_argument("--cutout", type=float, default=0.5,
                   help="Cutout (RandomErasing) probability; 0 disables")
    g.add_argument("--scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="random resized crop: area fraction range (unset: plain resize, "
                        "as the tutorial)")
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3],
                   metavar=("LO", "HI"), help="random resized crop: aspect ratio range")
    g.add_argument("--rotate", type=float, default=0.0,
                   help="random rotation up to this many degrees either way (0: off)")
    g.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=0.1,
                   help="probability of mixing a batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="probability of CutMix instead of Mixup when both are on")
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"), default="batch",
                   help="one mixing factor per batch, per pair or per image")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    g = p.add_argument_group("distillation (DeiT, as in the GroupMamba paper)")
    g.add_argument("--teacher", default=None, metavar="CKPT|NAME",
                   help="the teacher: a checkpoint written by train.py, an official GroupMamba "
                        "release file, or a timm model name with --teacher-checkpoint; it "
                        "must know the data's classes (unset: no teacher)")
    g.add_argument("--teacher-checkpoint", default=None, metavar="PATH",
                   help="weights of a --teacher given by timm model name")
    g.add_argument("--distillation-type", choices=DISTILLATION_TYPES, default="none",
                   help="none: no teacher (GroupMamba's two heads both learn the labels); "
                        "soft: KL divergence to the teacher's softened predictions; hard: "
                        "cross-entropy to the teacher's top-1 class (DeiT's best)")
    g.add_argument("--distillation-alpha", type=float, default=0.5,
                   help="weight of the teacher term; the label term gets 1 - alpha")
    g.add_argument("--distillation-tau", type=float, default=1.0,
                   help="temperature of soft distillation")

    g = p.add_argument_group("output and control")
    g.add_argument("--output", default=None,
                   help="run folder (unset: runs/<YYYYmmdd-HHMMSS>, or the --resume "
                        "checkpoint's folder)")
    g.add_argument("--force", action="store_true",
                   help="write into a non-empty --output, replacing train.py's files")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue from a last.pth (or the folder holding it)")
    g.add_argument("--save-every", type=int, default=1, metavar="N",
                   help="write last.pth and curves.png every N epochs and at the end "
                        "(best weights are kept in memory and written with them)")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the epoch that passes this much wall time since "
                        "the first step (unset: no limit); the schedule still spans "
                        "--epochs unless --fit-time-limit")
    g.add_argument("--fit-time-limit", action=argparse.BooleanOptionalAction, default=False,
                   help="with --time-limit: after each epoch from the second on, lower "
                        "--epochs to what fits into the limit at the median epoch time so "
                        "far (the first epoch, which compiles, left out), so the learning "
                        "rate decays fully before time runs out")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a set of defaults (unset: none); explicit flags still win "
                        + "; ".join(f"({name}: {values})" for name, values in PRESETS.items()))
    return p


def explicit_options(parser: argparse.ArgumentParser, argv) -> dict:
    """The options actually typed on the command line (defaults left out)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default


def check_args(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            parser.error(msg)

    need(a.epochs >= 1, "--epochs must be at least 1")
    need(a.save_every >= 1, "--save-every must be at least 1")
    need(a.time_limit is None or a.time_limit > 0, "--time-limit must be positive")
    need(not a.fit_time_limit or a.time_limit is not None,
         "--fit-time-limit needs --time-limit SECONDS")
    try:
        check_augment(a.scale, a.ratio, a.rotate)
    except ValueError as exc:
        need(False, str(exc))
    need(a.batch_size >= 1, "--batch-size must be at least 1")
    need(a.val_batch_size is None or a.val_batch_size >= 1,
         "--val-batch-size must be at least 1")
    need(a.img_size >= 16, "--img-size must be at least 16")
    need(a.workers >= 0, "--workers must be >= 0")
    need(a.lr > 0 and math.isfinite(a.lr), "--lr must be a positive number")
    need(a.min_lr >= 0, "--min-lr must be >= 0")
    need(a.weight_decay >= 0, "--weight-decay must be >= 0")
    need(a.warmup_epochs >= 0, "--warmup-epochs must be >= 0")
    need(a.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables)")
    need(0 <= a.ema_decay < 1, "--ema-decay must be in [0, 1) (0 disables EMA)")
    need(a.drop_path >= 0 and a.drop_path < 1, "--drop-path must be in [0, 1)")
    need(not a.fused_dwconv or is_groupmamba(a.model),
         f"--fused-dwconv applies to GroupMamba models only, not --model {a.model}")
    need(0.0 < a.memory_budget <= 1.0, f"--memory-budget must be in (0, 1], got {a.memory_budget}")
    need(a.memory_budget == 1.0 or a.compile, "--memory-budget applies to compiled code: add --compile")
    need(a.compile or not a.compile_stage_norms,
         "--compile-stage-norms applies to compiled code: add --compile")
    # one compiled step matches eager code on an H200, but both training runs that also
    # captured the step in a CUDA graph diverged (bench/RESULTS.md, eleventh session)
    need(not (a.compile_stage_norms and a.cuda_graph),
         "--compile-stage-norms diverged together with --cuda-graph (on in --preset fast); "
         "add --no-cuda-graph to try it")
    for name in ("hflip", "vflip", "transpose", "cutout", "mixup_prob", "mixup_switch_prob"):
        need(0 <= getattr(a, name) <= 1, f"--{name.replace('_', '-')} must be in [0, 1]")
    need(a.mixup >= 0 and a.cutmix >= 0, "--mixup and --cutmix must be >= 0")
    need(0 <= a.smoothing < 1, "--smoothing must be in [0, 1)")
    for name in ("max_train_batches", "max_val_batches"):
        v = getattr(a, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be at least 1")
    if a.distillation_type == "none":
        need(a.teacher is None, "--teacher is given but --distillation-type is none; choose "
             "--distillation-type hard (DeiT's best) or soft")
    else:
        need(a.teacher is not None, f"--distillation-type {a.distillation_type} needs a "
             "--teacher (a checkpoint written by train.py, an official GroupMamba release "
             "file, or a timm model name with --teacher-checkpoint)")
    need(a.teacher_checkpoint is None or a.teacher is not None,
         "--teacher-checkpoint needs --teacher <timm model name>")
    need(0 <= a.distillation_alpha <= 1, "--distillation-alpha must be in [0, 1]")
    need(a.distillation_tau > 0 and math.isfinite(a.distillation_tau),
         "--distillation-tau must be a positive number")
    if mixup_active(a):
        need(a.batch_size % 2 == 0, "Mixup/CutMix needs an even --batch-size "
             "(or turn them off with --mixup 0 --cutmix 0)")


def parse_args(argv=None) -> tuple[argparse.Namespace, dict | None]:
    """Defaults < --preset < the --resume checkpoint's arguments < explicit flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = explicit_options(parser, argv)
    values = vars(args)
    resume_ckpt = None
    if args.resume:
        path = Path(args.resume)
        if path.is_dir():
            path = path / "last.pth"
        try:
            resume_ckpt = load_checkpoint(path, RESUME_KEYS, "--resume")
        except CheckpointError as exc:
            parser.error(str(exc))
        if resume_ckpt.get("optimizer") is None:
            parser.error(f"{path} has no optimizer state (best.pth is for inference); "
                         "resume from last.pth")
        saved = resume_ckpt["args"]
        if "model" in explicit and explicit["model"] != saved.get("model"):
            parser.error(f"--model {explicit['model']} differs from the checkpoint's "
                         f"{saved.get('model')}; a resumed run keeps its model")
        values.update({k: v for k, v in saved.items()
                       if k in values and k not in NOT_INHERITED})
    preset = explicit.get("preset") if resume_ckpt else values.get("preset")
    if preset:
        values.update(PRESETS[preset])
    values.update(explicit)
    if resume_ckpt is not None:
        values["resume"] = str(path)  # the file, also when a folder was given
        if explicit.get("distillation_type") == "none" and "teacher" not in explicit:
            values["teacher"] = values["teacher_checkpoint"] = None  # drop the saved teacher
    check_args(parser, args)
    return args, resume_ckpt


def mixup_active(a) -> bool:
    return (a.mixup > 0 or a.cutmix > 0) and a.mixup_prob > 0


# ------------------------------------------------------------------------ set-up steps

def prepare_output(args) -> str:
    """Create the run folder; refuse to mix with someone else's files."""
    if args.output is None:
        args.output = (str(Path(args.resume).parent) if args.resume else
                       os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        resuming_here = args.resume and Path(args.resume).resolve().parent == out.resolve()
        if not (resuming_here or args.force):
            raise SystemExit(
                f"error: --output {out} is not empty; choose another --output, continue "
                f"that run with --resume {out / 'last.pth'}, or pass --force to replace "
                "train.py's files in it")
        if args.force and not resuming_here:
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return str(out)


def setup_logging(env: DistEnv, output: str | None) -> None:
    for handler in list(log.handlers):
        handler.close()
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if output and env.is_main:
        handler = logging.FileHandler(Path(output) / "train.log", encoding="utf-8")
        handler.setFormatter(fmt)
        log.addHandler(handler)


def scan_data(args):
    train, val = load_train_val(args.data, args.check_images, threads=max(2, args.workers))
    return train, val


def build_loaders(args, train_split, val_split, mean, std, env: DistEnv):
    """``(train loader, val loader, sampler with set_epoch, data path description)``."""
    nbytes = decoded_bytes(len(train_split.samples) + len(val_split.samples), args.img_size)
    # rank 0 decides for all (free memory may differ between GPUs)
    on, why = broadcast_object(choose_gpu_data(args.gpu_data, env.device, nbytes), env)
    val_order = ShardSampler(len(val_split.samples), env.rank, env.world_size, seed=args.seed)
    if on:
        per_rank = math.ceil(len(train_split.samples) / env.world_size)
        _check_batch(len(train_split.samples), per_rank, args.batch_size, env)
        train_loader, val_loader = build_gpu_loaders(args, train_split, val_split, mean, std,
                                                     env, list(val_order), val_batch_size(args))
        return train_loader, val_loader, train_loader, f"GPU-resident data ({why})"
    train_ds = ImageDataset(train_split.samples, train_transform(
        args.img_size, mean, std, args.hflip, args.vflip, args.cutout, args.scale,
        args.ratio, args.rotate, args.transpose))
    val_ds = ImageDataset(val_split.samples, eval_transform(args.img_size, mean, std))
    # DistributedSampler also in one process: a per-epoch, seed-determined shuffle
    # that a resumed run repeats exactly
    train_sampler = DistributedSampler(train_ds, num_replicas=env.world_size, rank=env.rank,
                                       shuffle=True, seed=args.seed, drop_last=False)
    _check_batch(len(train_ds), len(train_sampler), args.batch_size, env)
    # workers are not persistent: each epoch's workers are seeded from the main RNG,
    # which a checkpoint restores, so a resumed run augments exactly as an unbroken one
    common = dict(num_workers=args.workers, pin_memory=env.device.type == "cuda")
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=train_sampler,
                              drop_last=True, **common)
    val_loader = DataLoader(val_ds, batch_size=val_batch_size(args),
                            sampler=val_order, **common)
    return train_loader, val_loader, train_sampler, f"DataLoader ({why})"


def val_batch_size(args) -> int:
    """--val-batch-size, or --batch-size when unset (or absent from an older run's args)."""
    return getattr(args, "val_batch_size", None) or args.batch_size


def _check_batch(n: int, per_rank: int, batch_size: int, env: DistEnv) -> None:
    if per_rank < batch_size:
        raise SystemExit(
            f"error: {n} training images"
            + (f" ({per_rank} per process)" if env.distributed else "")
            + f" are fewer than --batch-size {batch_size}; lower --batch-size "
            "(the last incomplete batch is always dropped)")


def build_training(args, num_classes: int, steps_per_epoch: int, env: DistEnv, teacher=None):
    """Model, EMA, optimizer, scheduler, precision, criterion, Mixup and, with a
    teacher, the distillation loss that wraps the criterion."""
    kwargs = model_kwargs_for(args.model, num_classes, args.drop_path)
    model = create_model(args.model, kwargs, args.scan_backend)
    if args.fused_dwconv:
        model.set_fused_kernels(True)
    model_kwargs = describe_model(model, kwargs)
    loaded = None
    if args.pretrained and not args.resume:
        loaded = load_pretrained(model, args.model, args.pretrained)
    model.to(env.device)
    ema = ModelEma(model, decay=args.ema_decay, use_warmup=True, warmup_power=0.75) \
        if args.ema_decay > 0 else None
    # a captured step needs the optimizer state on the GPU and a device-side lr
    optimizer = build_optimizer(model, args.lr, args.weight_decay,
                                **(dict(fused=True, capturable=True) if args.cuda_graph else {}))
    total = args.epochs * steps_per_epoch
    # a warm-up longer than half the run would leave no time at the peak rate
    warmup = min(int(round(args.warmup_epochs * steps_per_epoch)), total // 2)
    scheduler = build_scheduler(optimizer, total, warmup, args.lr, args.min_lr)
    precision = Precision(args.amp, env.device)
    mixup_fn = None
    if mixup_active(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
                         mode=args.mixup_mode, label_smoothing=args.smoothing,
                         num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    distill = None if teacher is None else DistillationLoss(
        criterion, teacher.model, args.distillation_type, args.distillation_alpha,
        args.distillation_tau)
    return dict(model=model, model_kwargs=model_kwargs, loaded=loaded, ema=ema,
                optimizer=optimizer,
                scheduler=scheduler, precision=precision, mixup_fn=mixup_fn,
                criterion=criterion, total_steps=total, warmup_steps=warmup,
                teacher=teacher, distill=distill)


def setup_cuda_graphs(args, t: dict):
    """With --cuda-graph: the captured training step and the validation forwards of the
    model and its EMA (each captured after its first calls); else ``(None, plain models)``."""
    models = {"model": t["model"], "ema": t["ema"].module if t["ema"] is not None else None}
    if not args.cuda_graph:
        return None, models
    precision = t["precision"]
    step = CapturedTrainStep(t["model"], heads_loss(t["criterion"]), t["optimizer"],
                             precision.dtype, precision.enabled,
                             args.clip_grad if args.clip_grad > 0 else math.inf)
    return step, {name: None if m is None else CapturedForward(m, precision.dtype, precision.enabled)
                  for name, m in models.items()}


def restore(ckpt: dict, t: dict, class_names: list[str], env: DistEnv, seed: int,
            args_lr: float) -> dict:
    """Load a last.pth into the training objects; returns the loop state."""
    if ckpt["class_names"] != class_names:
        raise SystemExit(f"error: the data's classes {class_names} differ from the "
                         f"checkpoint's {ckpt['class_names']}")
    t["model"].load_state_dict(ckpt["model"])
    if t["ema"] is not None:
        if ckpt.get("model_ema") is not None:
            t["ema"].module.load_state_dict(ckpt["model_ema"])
        else:
            log.warning("checkpoint has no EMA weights: EMA restarts from the model's")
    t["optimizer"].load_state_dict(ckpt["optimizer"])
    t["scheduler"].load_state_dict(ckpt["scheduler"])
    # the saved base rates equal --lr unless --lr was given again: then it takes effect
    t["scheduler"].base_lrs = [args_lr * g.get("lr_scale", 1.0)
                               for g in t["optimizer"].param_groups]
    if ckpt.get("scaler"):
        t["precision"].scaler.load_state_dict(ckpt["scaler"])
    if env.world_size == 1:
        set_rng_state(ckpt.get("rng"))
    else:  # one saved state cannot serve every rank: re-seed per rank and epoch
        seed_everything(seed + 1000 * int(ckpt["epoch"]), env.rank)
    return {"epoch": int(ckpt["epoch"]), "global_step": int(ckpt["global_step"]),
            "best_acc1": float(ckpt["best_acc1"]),
            "best_epoch": int(ckpt.get("best_epoch") or 0),
            "best_source": ckpt.get("best_source") or "model",
            "history": list(ckpt.get("history") or [])}


def checkpoint_state(args, t, state, class_names, mean, std, full: bool) -> dict:
    model = unwrap_model(t["model"])
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "model_ema": t["ema"].module.state_dict() if t["ema"] is not None else None,
        "best_source": state["best_source"],
        "optimizer": t["optimizer"].state_dict() if full else None,
        "scaler": t["precision"].scaler.state_dict() if full else None,
        "scheduler": t["scheduler"].state_dict() if full else None,
        "rng": get_rng_state() if full else None,
        "epoch": state["epoch"], "global_step": state["global_step"],
        "best_acc1": state["best_acc1"], "best_epoch": state["best_epoch"],
        "model_name": args.model, "model_kwargs": to_plain(t["model_kwargs"]),
        "class_names": list(class_names), "mean": list(mean), "std": list(std),
        "img_size": int(args.img_size), "args": to_plain(args),
        "history": to_plain(state["history"]),
        "teacher": to_plain(t["teacher"].info) if t["teacher"] is not None else None,
    }


def final_report(args, t, val_split, mean, std, env: DistEnv, output: Path,
                 loader=None) -> None:
    """Per-class report and confusion matrix on all of val with best.pth's weights
    (``loader``: batches of all of val, e.g. GPU-resident; unset: a DataLoader)."""
    best = load_checkpoint(output / "best.pth", ("model", "class_names"))
    use_ema = best.get("best_source") == "ema" and best.get("model_ema") is not None
    model = unwrap_model(t["model"])
    model.load_state_dict(best["model_ema"] if use_ema else best["model"])
    if loader is None:
        loader = DataLoader(
            ImageDataset(val_split.samples, eval_transform(args.img_size, mean, std)),
            batch_size=val_batch_size(args), num_workers=args.workers,
            pin_memory=env.device.type == "cuda")
    y_true, y_pred = [], []
    # compiled regions keep their static shapes: pad the last batch like validate does
    static_batch = loader.batch_size if args.compile else None
    for probs, (labels,) in predict_batches(model, loader, t["precision"], env.device,
                                            "report", static_batch=static_batch):
        y_pred += probs.argmax(1).tolist()
        y_true += labels.tolist()
    names = best["class_names"]
    header = (f"validation report: {len(y_true)} images of {val_split.root}, best.pth "
              f"(epoch {best.get('best_epoch')}, {'EMA' if use_ema else 'raw'} weights, "
              f"{args.model}, {args.img_size} px)")
    summary = classification_report_files(y_true, y_pred, names, output / "report.txt",
                                          output / "report.json", header)
    plot_confusion_matrix(summary["confusion_matrix"], names, output / "confusion_matrix.png",
                          title=f"val, best.pth epoch {best.get('best_epoch')} "
                                f"({'EMA' if use_ema else 'raw'}), "
                                f"ACC1 {100 * summary['accuracy']:.2f} %")
    log.info("report on %d val images: ACC1 %.2f %% -> %s, %s", len(y_true),
             100 * summary["accuracy"], output / "report.txt", output / "confusion_matrix.png")


def check_teacher(args, t, val_loader, env: DistEnv, num_classes: int, resume_ckpt) -> None:
    """Log how the teacher is used and its accuracy on val (a check that it fits the data)."""
    teacher = t["teacher"]
    for note in teacher.notes:
        log.warning("teacher: %s", note)
    note = same_teacher_note((resume_ckpt or {}).get("teacher"), teacher.info)
    if note:
        log.warning("teacher: %s", note)
    with preserved_rng():  # a loader draws its seed from the RNG; keep the run's stream
        tv = validate(teacher.model, val_loader, t["precision"], env, num_classes,
                      args.max_val_batches, "teacher val")
    teacher.info["val_acc1"] = tv["acc1"]
    log.info("teacher: %s from %s (%s, %s weights, %.2f M params), val ACC1 %.2f %%; %s",
             teacher.info["model_name"], teacher.info["file"], teacher.info["kind"],
             teacher.info["weights"], teacher.info["params"] / 1e6, tv["acc1"],
             describe(args.distillation_type, args.distillation_alpha, args.distillation_tau,
                      t["model_kwargs"]))


# ------------------------------------------------------------------------ the run

def run(args, resume_ckpt, env: DistEnv) -> None:
    setup_logging(env, None)
    seed_everything(args.seed)  # the same initial weights on every rank
    set_scan_backend(args.scan_backend)
    check_model_name(args.model)
    if args.pretrained and not Path(args.pretrained).is_file():
        raise CheckpointError(f"--pretrained file not found: {args.pretrained}")
    teacher_source = (resolve_teacher_source(args.teacher, args.teacher_checkpoint)
                      if args.teacher else None)
    try:
        mean, std, stats_msg = load_stats(args.stats)
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc
    # every input is checked before the output folder is created
    clock = {"imports and set-up": time.perf_counter()}
    train_split, val_split = run_on_main(lambda: scan_data(args), env,
                                         errors=(DatasetError, OSError))
    clock[f"image check ({args.check_images})"] = time.perf_counter()
    if env.device.type == "cuda":
        torch.zeros(1, device=env.device)  # CUDA's start-up, timed on its own
        clock["CUDA start-up"] = time.perf_counter()
    train_loader, val_loader, sampler, data_path = build_loaders(args, train_split, val_split,
                                                                 mean, std, env)
    clock["data loaders"] = time.perf_counter()
    steps = len(train_loader) if args.max_train_batches is None else \
        min(len(train_loader), args.max_train_batches)
    teacher = None if teacher_source is None else setup_teacher(
        teacher_source, train_split.classes, args.img_size, mean, std, env.device,
        args.scan_backend, env.data_parallel)
    if args.cuda_graph:
        problem = cuda_graph_problem(env.device, env.distributed, env.data_parallel,
                                     resolve_amp(args.amp, env.device) == "fp16",
                                     teacher_source is not None)
        if problem:
            log.warning("--cuda-graph is off: %s", problem)
            args.cuda_graph = False
    t = build_training(args, len(train_split.classes), steps, env, teacher)
    clock["model"] = time.perf_counter()
    seed_everything(args.seed, env.rank)  # each rank its own augmentation stream
    output = Path(run_on_main(lambda: prepare_output(args), env))
    args.output = str(output)
    setup_logging(env, str(output))
    classes = train_split.classes
    log.info("data %s: %d classes, %d train / %d val images; %s", args.data, len(classes),
             len(train_split.samples), len(val_split.samples), stats_msg)
    log.info("data path: %s", data_path)
    marks = [PROCESS_START] + list(clock.values())
    log.info("start-up %.1f s (%s)", marks[-1] - PROCESS_START,
             ", ".join(f"{name} {end - begin:.1f} s"
                       for name, begin, end in zip(clock, marks, marks[1:])))
    if t["loaded"]:
        log.info(t["loaded"])
    skipped = train_split.skipped + val_split.skipped
    if skipped and env.is_main:
        log.warning("skipped %d file(s) that cannot be used (listed in "
                    "skipped_images.txt), e.g. %s", len(skipped), skipped[0][1])
        atomic_write_text(output / "skipped_images.txt",
                          "".join(f"{p}\t{r}\n" for p, r in skipped))
    state = {"epoch": 0, "global_step": 0, "best_acc1": -1.0, "best_epoch": 0,
             "best_source": "model", "history": []}
    if resume_ckpt is not None:
        state = restore(resume_ckpt, t, classes, env, args.seed, args.lr)
        log.info("resumed from %s at epoch %d (best ACC1 %.2f %%)", args.resume,
                 state["epoch"], state["best_acc1"])
        if state["epoch"] >= args.epochs:
            raise SystemExit(f"error: {args.resume} has already trained {state['epoch']} "
                             f"epochs; pass --epochs larger than that to continue")
    if args.compile and env.data_parallel:
        # DataParallel's replicas would call the compiled code bound to the original module
        log.warning("--compile is not supported under DataParallel; training without it "
                    "(for several GPUs and compiling, use torchrun --nproc_per_node=N)")
        args.compile = False
    if args.compile:
        # import the scan kernels now: an import inside the traced code breaks the graph
        resolve_backend(args.scan_backend, env.device)
        functorch_config.activation_memory_budget = args.memory_budget
        # static shapes: training batches all have one size (the last one is dropped)
        # and validation pads its last batch (validate's static_batch)
        for module in [t["model"]] + ([t["ema"].module] if t["ema"] is not None else []):
            regions = compile_blocks(module, stage_norms=args.compile_stage_norms,
                                     pad_matmuls=args.pad_matmuls, dynamic=False)
        log.info("compiling %d regions of the model%s in the first steps", len(regions),
                 " and of its EMA" if t["ema"] is not None else "")
    model = wrap_model(t["model"], env)
    captured_step, eval_models = setup_cuda_graphs(args, t)
    if t["teacher"] is not None:  # before args.json, which records its val accuracy
        check_teacher(args, t, val_loader, env, len(classes), resume_ckpt)
    if env.is_main:
        n_params = sum(p.numel() for p in t["model"].parameters())
        log.info("%s (%.2f M params, %s), %s on %s, amp %s, batch %d x %d process(es), "
                 "%d steps/epoch, %d warm-up steps, EMA %s, Mixup %s", args.model,
                 n_params / 1e6, t["model_kwargs"], env.mode, env.device,
                 t["precision"].mode, args.batch_size, env.world_size, steps,
                 t["warmup_steps"], args.ema_decay or "off",
                 "on" if t["mixup_fn"] else "off")
        atomic_write_json(output / "args.json", {**to_plain(args), "run": {
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "device": str(env.device), "mode": env.mode, "world_size": env.world_size,
            "amp": t["precision"].mode, "num_classes": len(classes), "class_names": classes,
            "train_images": len(train_split.samples), "val_images": len(val_split.samples),
            "steps_per_epoch": steps, "mean": mean, "std": std, "data_path": data_path,
            "torch": torch.__version__, "python": platform.python_version(),
            "teacher": to_plain(t["teacher"].info) if t["teacher"] else None}})

    # wall time since the first step; a resumed run continues its predecessor's clock
    elapsed_before = float((state["history"][-1:] or [{}])[0].get("elapsed_s") or 0.0)
    run_start = time.perf_counter()
    best_pending = None  # best weights not yet on disk (with --save-every > 1)
    first_epoch = state["epoch"] + 1
    for epoch in range(first_epoch, args.epochs + 1):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        try:
            tr = train_one_epoch(model, train_loader, t["criterion"], t["optimizer"],
                                 t["scheduler"], t["precision"], env, epoch, len(classes),
                                 mixup_fn=t["mixup_fn"], ema=t["ema"],
                                 clip_grad=args.clip_grad,
                                 max_batches=args.max_train_batches,
                                 global_step=state["global_step"], distill=t["distill"],
                                 captured_step=captured_step)
        except NonFiniteLossError as exc:
            last = output / "last.pth"
            kept = (f"the last good checkpoint is {last} (epoch {state['epoch']})"
                    if state["epoch"] > 0 and last.exists() else "no checkpoint was written")
            log.error("error: %s; %s", exc, kept)
            raise SystemExit(1) from exc
        state["global_step"] = tr["global_step"]
        # under DDP each rank evaluates its shard with the bare model: no collective
        # calls inside forward, so ranks with one batch more or less cannot hang;
        eval_model = unwrap_model(model) if env.distributed else model
        if args.cuda_graph:
            eval_model = eval_models["model"]
        # compiled blocks and graphs see one batch size only: a smaller last batch is padded
        static_batch = val_loader.batch_size if args.compile or args.cuda_graph else None
        val_start = time.perf_counter()
        va = validate(eval_model, val_loader, t["precision"], env, len(classes),
                      args.max_val_batches, f"epoch {epoch} val", static_batch)
        ev = (validate(eval_models["ema"], val_loader, t["precision"], env, len(classes),
                       args.max_val_batches, f"epoch {epoch} val EMA", static_batch)
              if t["ema"] is not None else None)
        val_s = time.perf_counter() - val_start
        source, acc1 = max([("model", va["acc1"])] + ([("ema", ev["acc1"])] if ev else []),
                           key=lambda kv: kv[1])
        improved = acc1 > state["best_acc1"]
        if improved:
            state.update(best_acc1=acc1, best_epoch=epoch, best_source=source)
        state["epoch"] = epoch
        row = {"epoch": epoch, "lr": tr["lr"], "train_loss": tr["loss"],
               "train_acc1": tr["acc1"], "train_acc5": tr["acc5"], "val_loss": va["loss"],
               "val_acc1": va["acc1"], "val_acc5": va["acc5"],
               "ema_val_loss": ev["loss"] if ev else None,
               "ema_val_acc1": ev["acc1"] if ev else None,
               "ema_val_acc5": ev["acc5"] if ev else None,
               "best_acc1": state["best_acc1"], "best_epoch": state["best_epoch"],
               "best_source": state["best_source"], "train_img_s": tr["img_s"],
               "epoch_time_s": time.perf_counter() - t0, "grad_norm": tr["grad_norm"],
               "elapsed_s": elapsed_before + time.perf_counter() - run_start}
        state["history"].append(row)
        if args.fit_time_limit:
            fit_schedule_to_time(args, t, state, steps, env)
        out_of_time = args.time_limit is not None and row["elapsed_s"] >= args.time_limit
        save_now = epoch % args.save_every == 0 or epoch == args.epochs or out_of_time
        if env.is_main:
            if improved:
                best_pending = to_cpu(checkpoint_state(args, t, state, classes, mean, std,
                                                       False))
            if save_now and best_pending is not None:
                save_checkpoint(best_pending, output / "best.pth")
                best_pending = None
            if save_now:
                save_checkpoint(checkpoint_state(args, t, state, classes, mean, std, True),
                                output / "last.pth")
                plot_curves(state["history"], output / "curves.png")
            write_csv(output / "metrics.csv", METRIC_FIELDS, state["history"])
            log.info("epoch %d/%d  train loss %.4f acc1 %.2f  |  val loss %.4f acc1 %.2f "
                     "acc5 %.2f%s  |  best %.2f (%s, epoch %d)%s  %.0fs %.1f img/s", epoch,
                     args.epochs, tr["loss"], tr["acc1"], va["loss"], va["acc1"], va["acc5"],
                     f"  |  EMA acc1 {ev['acc1']:.2f}" if ev else "", state["best_acc1"],
                     state["best_source"], state["best_epoch"], "  *" if improved else "",
                     row["epoch_time_s"], tr["img_s"])
            if epoch == first_epoch + 1:  # the first epoch after compiling and warm-up
                log.info("host time per training step: %s (of %.1f ms a step)",
                         ", ".join(f"{k} {v:.1f} ms" for k, v in tr["host_ms"].items()),
                         1000.0 * tr["time_s"] / max(tr["steps"], 1))
            if args.compile and epoch == first_epoch:
                # this process's first epoch compiled the training and the evaluation graphs
                log.info("compiling in epoch %d: %s; the epoch took %.1f s training, %.1f s "
                         "validating", epoch, describe_compile_seconds(compile_seconds()),
                         val_start - t0, val_s)
        barrier(env)
        if out_of_time:
            log.info("--time-limit %.0f s reached after epoch %d (%.1f s since the first "
                     "step); stopping", args.time_limit, epoch, row["elapsed_s"])
            break
        if epoch >= args.epochs:  # --fit-time-limit shortened the run
            break

    barrier(env)
    if env.is_main:
        final_report(args, t, val_split, mean, std, env, output,
                     full_eval_loader(val_loader) if isinstance(val_loader, GpuLoader)
                     else None)
        log.info("done: %s (best ACC1 %.2f %% at epoch %d, %s weights)", output,
                 state["best_acc1"], state["best_epoch"], state["best_source"])


def epochs_within_limit(history: list[dict], time_limit: float) -> int | None:
    """How many epochs in all end within ``time_limit`` seconds from the first step at
    the median time of the epochs after the first (None before the second epoch)."""
    times = sorted(float(r["epoch_time_s"]) for r in history[1:])
    if not times:
        return None
    per_epoch = times[len(times) // 2]
    remaining = time_limit - float(history[-1]["elapsed_s"])
    return int(history[-1]["epoch"]) + max(0, math.floor(remaining / per_epoch))


def fit_schedule_to_time(args, t, state, steps_per_epoch: int, env: DistEnv) -> None:
    """--fit-time-limit: shorten args.epochs and the learning-rate schedule to the epochs
    that fit into --time-limit (never lengthen them). Rank 0 decides for all ranks."""
    fitted = broadcast_object(epochs_within_limit(state["history"], args.time_limit), env)
    if fitted is None or fitted >= args.epochs:
        return
    log.info("--fit-time-limit: %d epochs fit into %.0f s at this speed (of %d); the "
             "learning-rate schedule now ends at epoch %d", fitted, args.time_limit,
             args.epochs, fitted)
    args.epochs = fitted
    set_schedule_length(t["scheduler"], fitted * steps_per_epoch, t["warmup_steps"],
                        args.lr, args.min_lr)


def main(argv=None) -> None:
    args, resume_ckpt = parse_args(argv)
    env = setup_distributed(args.device)
    try:
        run(args, resume_ckpt, env)
    except (DatasetError, CheckpointError, ModelConfigError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the last checkpoint written is intact "
                         "(continue with --resume <output>/last.pth)") from None
    finally:
        cleanup_distributed(env)


if __name__ == "__main__":
    main()
