"""Train an image classifier (GroupMamba by default, any timm model by name) on the class
folders ``<data>/train/<class>/`` and validate on ``<data>/val/<class>/``.

    python train.py --preset quick      # a check that everything works: about a minute on a CPU
    python train.py                     # groupmamba_tiny, 224 px, 100 epochs
    python train.py --preset fast       # the short recipe for one GPU

``python train.py --help`` lists the options and README.md what a run writes. The script
reads top to bottom: the configuration, the data, the model, the epochs, the report.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import time

PROCESS_START = time.perf_counter()  # before the heavy imports, for the start-up log line

from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402
from timm.data import Mixup  # noqa: E402

from models import CheckpointError, ModelConfigError, create_model, load_pretrained  # noqa: E402
from utils.accel import (compile_regions, compile_seconds, cuda_graph_runners,  # noqa: E402
                         describe_compile_seconds, plan_compile, plan_speed, set_grad_checkpointing)
from utils.amp import Precision, resolve_amp  # noqa: E402
from utils.compile_cache import ARTIFACTS_FILE, keep_artifacts  # noqa: E402
from utils.checkpoint import (RunState, load_checkpoint, prepare_run_folder, restore_training,  # noqa: E402
                              run_description, save_best, save_checkpoint, to_cpu, to_plain, training_checkpoint)
from utils.config import memory_hint, parse_config  # noqa: E402
from utils.datasets import DatasetError, SkippedImages, load_train_val  # noqa: E402
from utils.distillation import (DistillationLoss, check_teacher, resolve_teacher_source,  # noqa: E402
                                setup_teacher)
from utils.distributed import (DistEnv, barrier, broadcast_object, cleanup_distributed,  # noqa: E402
                               failures_named, run_on_main, setup_distributed, unwrap_model, wrap_model)
from utils.ema import ModelEma  # noqa: E402
from utils.engine import NonFiniteLossError, heads_loss, predict_batches, train_one_epoch, validate  # noqa: E402
from utils.errors import exit_if_known, setup_logging  # noqa: E402
from utils.images import atomic_write_json  # noqa: E402
from utils.interrupt import INTERRUPTED_EXIT_CODE, stop_on_sigint  # noqa: E402
from utils.loaders import build_loaders, report_loader  # noqa: E402
from utils.memory import check_step_memory  # noqa: E402
from utils.optim import (build_loss, build_optimizer, build_scheduler, epochs_within_limit,  # noqa: E402
                         set_schedule_length)
from utils.progress import ProgressLines, progress_lines  # noqa: E402
from utils.report import EpochLog, plot_curves, write_classification_report  # noqa: E402
from utils.run_folder import release_run_lock  # noqa: E402
from utils.seed import seed_everything  # noqa: E402
from utils.transforms import load_stats  # noqa: E402

log = logging.getLogger("train")

OUTPUT_FILES = ("args.json", "train.log", "metrics.csv", "curves.png", "last.pth", "best.pth", "best.safetensors",
                "report.txt", "report.json", "confusion_matrix.png", "skipped_images.txt", "tensorboard",
                ARTIFACTS_FILE)
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc1", "train_acc5", "val_loss", "val_acc1", "val_acc5",
                 "ema_val_loss", "ema_val_acc1", "ema_val_acc5", "best_acc1", "best_epoch", "best_source",
                 "train_img_s", "epoch_time_s", "elapsed_s", "grad_norm")


@dataclass
class Parts:
    """What the epochs train with."""
    model: torch.nn.Module
    model_kwargs: dict  # recorded in checkpoints: test.py rebuilds the model from them
    ema: Optional[ModelEma]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    criterion: Any
    mixup_fn: Optional[Mixup]
    warmup_steps: int
    teacher: Any = None
    distill: Optional[DistillationLoss] = None
    loaded: str = ""  # what --pretrained loaded, for the log
    lines: Optional[ProgressLines] = None  # progress lines in the log when it is not on a terminal


# ------------------------------------------------------------------------ set-up

def build_parts(config, plan, num_classes: int, steps_per_epoch: int, env: DistEnv, teacher) -> Parts:
    kwargs = {"num_classes": num_classes, **({"drop_path_rate": config.drop_path} if config.drop_path > 0 else {})}
    model = create_model(config.model, scan_backend=plan.scan_backend, fused_kernels=plan.fused_kernels, **kwargs)
    if not set_grad_checkpointing(model, plan):
        log.warning("%s has no gradient checkpointing: it trains with all activations kept", config.model)
    if isinstance(getattr(model, "distillation", None), bool):
        kwargs["distillation"] = model.distillation
    loaded = ""
    if config.pretrained and not config.resume:
        loaded = f"loaded pretrained weights from {config.pretrained} ({load_pretrained(model, config.pretrained)})"
    model.to(env.device)
    ema = ModelEma(model, decay=config.ema_decay, use_warmup=True, warmup_power=0.75) if config.ema_decay else None
    optimizer = build_optimizer(model, config.lr, config.weight_decay, **plan.optimizer_options())
    total = config.epochs * steps_per_epoch
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total // 2)  # keep time at the peak
    mixup_fn, criterion = build_loss(config, num_classes)
    distill = None if teacher is None else DistillationLoss(
        criterion, teacher.model, config.distillation_type, config.distillation_alpha, config.distillation_tau)
    return Parts(model, kwargs, ema, optimizer, build_scheduler(optimizer, total, warmup, config.lr, config.min_lr),
                 Precision(config.amp, env.device), criterion, mixup_fn, warmup, teacher, distill, loaded,
                 progress_lines(log, config.progress_every))


# ------------------------------------------------------------------------ the epochs

def run_epoch(config, parts: Parts, model, loaders, runners, env: DistEnv, state: RunState, num_classes: int) -> dict:
    """One epoch of training and validation (raw and EMA weights); the metrics.csv row."""
    train_loader, val_loader, captured_step, static_batch = loaders
    start = time.perf_counter()
    tr = train_one_epoch(model, train_loader, parts.criterion, parts.optimizer, parts.scheduler, parts.precision,
                         env, state.epoch + 1, num_classes, mixup_fn=parts.mixup_fn, ema=parts.ema,
                         clip_grad=config.clip_grad, max_batches=config.max_train_batches, lines=parts.lines,
                         global_step=state.global_step, distill=parts.distill, captured_step=captured_step)
    val_start = time.perf_counter()
    va, ev = [None if runner is None else
              validate(runner, val_loader, parts.precision, env, num_classes, config.max_val_batches,
                       f"epoch {state.epoch + 1} val{' EMA' if name == 'ema' else ''}", static_batch, parts.lines)
              for name, runner in runners.items()]
    state.epoch, state.global_step = state.epoch + 1, tr["global_step"]
    # rank 0's figures choose the best epoch for every rank
    source, acc1 = broadcast_object(max([("model", va["acc1"])] + ([("ema", ev["acc1"])] if ev else []),
                                        key=lambda kv: kv[1]), env)
    if acc1 > state.best_acc1:
        state.best_acc1, state.best_epoch, state.best_source = acc1, state.epoch, source
    ema = {f"ema_val_{k}": ev[k] if ev else None for k in ("loss", "acc1", "acc5")}
    return {"epoch": state.epoch, "lr": tr["lr"], "train_loss": tr["loss"], "train_acc1": tr["acc1"],
            "train_acc5": tr["acc5"], "val_loss": va["loss"], "val_acc1": va["acc1"], "val_acc5": va["acc5"], **ema,
            "best_acc1": state.best_acc1, "best_epoch": state.best_epoch, "best_source": state.best_source,
            "train_img_s": tr["img_s"], "grad_norm": tr["grad_norm"], "epoch_time_s": time.perf_counter() - start,
            "train_s": val_start - start, "host_ms": tr["host_ms"], "steps": tr["steps"], "time_s": tr["time_s"]}


def log_epoch(row: dict, state: RunState, first_epoch: int, compiled: bool) -> None:
    ema = f"  |  EMA acc1 {row['ema_val_acc1']:.2f}" if row["ema_val_acc1"] is not None else ""
    log.info("epoch %d/%d  train loss %.4f acc1 %.2f  |  val loss %.4f acc1 %.2f acc5 %.2f%s  |  best %.2f "
             "(%s, epoch %d)%s  %.0fs %.1f img/s", row["epoch"], state.epochs, row["train_loss"],
             row["train_acc1"], row["val_loss"], row["val_acc1"], row["val_acc5"], ema, state.best_acc1,
             state.best_source, state.best_epoch, "  *" if state.best_epoch == row["epoch"] else "",
             row["epoch_time_s"], row["train_img_s"])
    if row["epoch"] == first_epoch and compiled:  # it compiled the training and evaluation graphs
        log.info("compiling in epoch %d: %s; the epoch took %.1f s training, %.1f s validating", row["epoch"],
                 describe_compile_seconds(compile_seconds()), row["train_s"], row["epoch_time_s"] - row["train_s"])
    if row["epoch"] == first_epoch + 1:  # the first epoch after compiling and warm-up
        log.info("host time per training step: %s (of %.1f ms a step)",
                 ", ".join(f"{k} {v:.1f} ms" for k, v in row["host_ms"].items()),
                 1000.0 * row["time_s"] / max(row["steps"], 1))


def fit(config, parts: Parts, plan, model, loaders, env: DistEnv, output: Path, meta: dict, state: RunState,
        steps_per_epoch: int, skipped: SkippedImages) -> None:
    train_loader, val_loader, sampler = loaders
    captured_step, runners = cuda_graph_runners(plan, parts.model, parts.ema.module if parts.ema else None,
                                                heads_loss(parts.criterion), parts.optimizer, parts.precision,
                                                config.clip_grad)
    if not plan.cuda_graph:  # under DDP each rank evaluates its shard with the bare model
        runners["model"] = unwrap_model(model) if env.distributed else model
    # compiled blocks and graphs see one batch size only: a smaller last batch is padded
    static_batch = val_loader.batch_size if plan.compile or plan.cuda_graph else None
    elapsed_before = float((state.history[-1:] or [{}])[0].get("elapsed_s") or 0.0)  # a resumed run's clock
    run_start, first_epoch, best_pending = time.perf_counter(), state.epoch + 1, None
    epoch_log = EpochLog(output, METRIC_FIELDS, tensorboard=config.tensorboard and env.is_main)
    while state.epoch < state.epochs:
        sampler.set_epoch(state.epoch + 1)
        try:
            row = run_epoch(config, parts, model, (train_loader, val_loader, captured_step, static_batch),
                            runners, env, state, len(meta["class_names"]))
        except NonFiniteLossError as exc:
            last = output / "last.pth"
            kept = (f"the last good checkpoint is {last} (epoch {state.epoch})" if last.exists()
                    else "no checkpoint was written")
            log.error("error: %s; %s", exc, kept)
            raise SystemExit(1) from exc
        row["elapsed_s"] = broadcast_object(elapsed_before + time.perf_counter() - run_start, env)  # rank 0's clock
        state.history.append({k: row[k] for k in METRIC_FIELDS})
        if config.fit_time_limit:  # rank 0 decides for all
            fitted = broadcast_object(epochs_within_limit(state.history, config.time_limit), env)
            if fitted is not None and fitted < state.epochs:
                log.info("--fit-time-limit: %d epochs fit into %.0f s at this speed (of %d); the learning-rate "
                         "schedule now ends at epoch %d", fitted, config.time_limit, state.epochs, fitted)
                state.epochs = fitted
                set_schedule_length(parts.scheduler, fitted * steps_per_epoch, parts.warmup_steps, config.lr,
                                    config.min_lr, state.global_step)
        out_of_time = config.time_limit is not None and row["elapsed_s"] >= config.time_limit
        if env.is_main:
            if state.best_epoch == state.epoch:  # kept in memory until the next save
                best_pending = to_cpu(training_checkpoint(config, parts, state, meta, full=False))
            if state.epoch % config.save_every == 0 or state.epoch == state.epochs or out_of_time:
                if best_pending is not None:
                    save_best(best_pending, output, config.save_safetensors)
                    best_pending = None
                save_checkpoint(training_checkpoint(config, parts, state, meta, full=True), output / "last.pth")
                plot_curves(state.history, output / "curves.png")
            epoch_log.write(state.history)
            log_epoch(row, state, first_epoch, plan.compile)
            if state.epoch == first_epoch and plan.compile:  # what was compiled, for the next run and --resume
                log.info(keep_artifacts(output / ARTIFACTS_FILE))
            skipped.report(output / "skipped_images.txt", log)
        barrier(env)
        if out_of_time:
            log.info("--time-limit %.0f s reached after epoch %d (%.1f s since the first step); stopping",
                     config.time_limit, state.epoch, row["elapsed_s"])
            break


# ------------------------------------------------------------------------ the report

def final_report(config, parts: Parts, plan, loader, env: DistEnv, output: Path, val_root) -> None:
    """Per-class report and confusion matrix on all of val with best.pth's weights."""
    best = load_checkpoint(output / "best.pth", ("model", "class_names"))
    model = unwrap_model(parts.model)  # the weights best.pth was chosen on (either layout)
    weights = "EMA" if load_pretrained(model, best, reset_head=False).source == "model_ema" else "raw"
    y_true, y_pred = [], []
    # compiled regions keep their static shapes: pad the last batch like validate does
    for probs, (labels,) in predict_batches(model, loader, parts.precision, env.device, "report", lines=parts.lines,
                                            static_batch=loader.batch_size if plan.compile else None):
        y_pred += probs.argmax(1).tolist()
        y_true += labels.tolist()
    epoch = best.get("best_epoch")
    header = (f"validation report: {len(y_true)} images of {val_root}, best.pth (epoch {epoch}, {weights} "
              f"weights, {config.model}, {config.img_size} px)")
    paths = {"txt": output / "report.txt", "json": output / "report.json", "png": output / "confusion_matrix.png"}
    summary = write_classification_report(y_true, y_pred, best["class_names"], paths, header,
                                          f"val, best.pth epoch {epoch} ({weights})")
    log.info("report on %d val images: ACC1 %.2f %% -> %s, %s", len(y_true), 100 * summary["accuracy"],
             paths["txt"], paths["png"])


# ------------------------------------------------------------------------ the run

def run(config, resume_ckpt: Optional[dict], env: DistEnv) -> None:
    setup_logging(log, env.is_main)
    seed_everything(config.seed)  # the same initial weights on every rank
    torch.set_num_threads(config.threads)  # chosen with the workers by parse_config (utils.cpu)
    try:
        mean, std, stats_msg = load_stats(config.stats)
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc
    plan = plan_speed(config, env, grad_scaling=resolve_amp(config.amp, env.device) == "fp16")
    check_step_memory(config, plan.grad_checkpointing, env.device)  # before minutes of image checks
    teacher_source = resolve_teacher_source(config.teacher, config.teacher_checkpoint) if config.teacher else None
    # every input is checked before the output folder is created
    clock = {"imports and set-up": time.perf_counter()}
    train_split, val_split = run_on_main(lambda: load_train_val(config.data, config.check_images, config.threads),
                                         env, errors=(DatasetError, OSError))
    classes = train_split.classes
    clock[f"image check ({config.check_images})"] = time.perf_counter()
    skipped = SkippedImages(train_split.skipped + val_split.skipped)
    train_loader, val_loader, sampler, data_path = build_loaders(config, train_split, val_split, mean, std, env,
                                                                 skipped)
    clock["data loaders"] = time.perf_counter()
    steps = min(len(train_loader), config.max_train_batches or len(train_loader))
    plan = plan_compile(plan, config, env, steps, (resume_ckpt or {}).get("epoch", 0), len(val_split.samples))
    teacher = None if teacher_source is None else setup_teacher(
        teacher_source, classes, config.img_size, mean, std, env.device, plan.scan_backend, env.data_parallel)
    parts = build_parts(config, plan, len(classes), steps, env, teacher)
    clock["model"] = time.perf_counter()
    seed_everything(config.seed, env.rank)  # each rank its own augmentation stream
    output, folder_notes = run_on_main(lambda: prepare_run_folder(config, OUTPUT_FILES), env)  # locked till main ends
    setup_logging(log, env.is_main, output / "train.log")
    log.info("data %s: %d classes, %d train / %d val images; %s; %s; %s", config.data, len(classes),
             len(train_split.samples), len(val_split.samples), stats_msg, data_path, config.cpu_plan)
    marks = [PROCESS_START] + list(clock.values())
    log.info("start-up %.1f s (%s)", marks[-1] - PROCESS_START,
             ", ".join(f"{name} {end - begin:.1f} s" for name, begin, end in zip(clock, marks, marks[1:])))
    if parts.loaded:
        log.info(parts.loaded)
    for note in (*folder_notes, *plan.notes):
        log.warning(note)
    if env.is_main:
        skipped.report(output / "skipped_images.txt", log)
    state = (RunState(config.epochs) if resume_ckpt is None
             else restore_training(resume_ckpt, parts, classes, env, config, steps))
    if plan.compile:
        regions = compile_regions([parts.model] + ([parts.ema.module] if parts.ema else []), plan)
        log.info("compiling %d regions of the model%s in the first steps", len(regions),
                 " and of its EMA" if parts.ema else "")
    model = wrap_model(parts.model, env)
    if parts.teacher is not None:  # before args.json, which records its val accuracy
        check_teacher(parts.teacher, config, lambda m: validate(m, val_loader, parts.precision, env, len(classes),
                                                                config.max_val_batches, "teacher val"),
                      (resume_ckpt or {}).get("teacher"), parts.model_kwargs)
    meta = run_description(parts.model, config.img_size, classes, mean, std)
    if env.is_main:
        log.info("%s (%.2f M params, %s), %s on %s, amp %s, %s, batch %d x %d process(es), %d steps/epoch, "
                 "%d warm-up steps, EMA %s, Mixup %s", config.model,
                 sum(p.numel() for p in parts.model.parameters()) / 1e6, parts.model_kwargs, env.mode, env.device,
                 parts.precision.mode, plan.describe(), config.batch_size, env.world_size, steps,
                 parts.warmup_steps, config.ema_decay or "off", "on" if parts.mixup_fn else "off")
        atomic_write_json(output / "args.json", {**to_plain(config), "run": to_plain({
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "output": str(output),
            "device": str(env.device), "mode": env.mode, "world_size": env.world_size,
            "amp": parts.precision.mode, "speed": asdict(plan), "num_classes": len(classes),
            "class_names": classes, "train_images": len(train_split.samples),
            "val_images": len(val_split.samples), "steps_per_epoch": steps, "mean": mean, "std": std,
            "data_path": data_path, "torch": torch.__version__, "python": platform.python_version(),
            "teacher": parts.teacher.info if parts.teacher else None})})
    fit(config, parts, plan, model, (train_loader, val_loader, sampler), env, output, meta, state, steps, skipped)
    barrier(env)
    if env.is_main:
        final_report(config, parts, plan, report_loader(config, val_loader, val_split, mean, std, env), env,
                     output, val_split.root)
        skipped.report(output / "skipped_images.txt", log)
        log.info("done: %s (best ACC1 %.2f %% at epoch %d, %s weights)", output, state.best_acc1,
                 state.best_epoch, state.best_source)


def main(argv=None) -> None:
    config, resume_ckpt = parse_config(argv)
    env = setup_distributed(config.device)
    with failures_named(env):  # under torchrun: which rank failed, here and in torchrun's summary
        try:
            with stop_on_sigint():  # a second Ctrl-C exits at once
                run(config, resume_ckpt, env)
        except Exception as exc:
            exit_if_known(exc, known=(DatasetError, CheckpointError, ModelConfigError), memory_hint=memory_hint(config))
            raise
        except KeyboardInterrupt:
            print("interrupted; the checkpoints written so far are intact (a run with a last.pth continues "
                  "with --resume <output>/last.pth)", file=sys.stderr, flush=True)
            raise SystemExit(INTERRUPTED_EXIT_CODE) from None
        finally:
            release_run_lock()  # rank 0's, however the run ended
            cleanup_distributed(env)


if __name__ == "__main__":
    main()
