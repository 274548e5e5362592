"""Speed decisions in one place: which scan runs, what is compiled, which steps are
replayed from CUDA graphs, where GroupMamba's fused kernels run, how much activation
memory is kept (``--low-memory``, gradient checkpointing).

:func:`plan_speed` turns the requested settings into a :class:`SpeedPlan` once, before
the model is built, and :func:`plan_compile` settles ``--compile auto`` once the run's
length is known; train.py logs the plan, records it in ``args.json`` and passes it down.
The helpers below carry it out: :func:`compile_regions` (regional compilation of the
model and its EMA) and :func:`cuda_graph_runners` (the captured training step and
validation forwards, :mod:`utils.cuda_graphs`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch._functorch.config as functorch_config

from kernels import HAS_TRITON, grid_scan
from kernels.selective_scan import BackendUnavailableError, available_backends
from models import is_groupmamba
from utils.compile_cache import prepare_compile_cache
from utils.cuda_graphs import CapturedForward, CapturedTrainStep
from utils.memory import step_fits

__all__ = ["LOW_MEMORY_BUDGET", "SpeedPlan", "choose_grad_checkpointing", "compile_blocks", "compile_estimate",
           "compile_regions", "compile_seconds", "cuda_graph_problem", "cuda_graph_runners", "decide_compile",
           "describe_compile_seconds", "plan_compile", "plan_speed", "resolve_scan_backend", "set_grad_checkpointing"]

# the compiler's activation memory budget with --low-memory: below 1 its partitioner
# recomputes cheap activations in the backward instead of keeping them (same numerics;
# groupmamba_tiny, batch 128, H100: 6.8 GiB instead of 11.3 for a tenth of the speed)
LOW_MEMORY_BUDGET = 0.9


@dataclass(frozen=True)
class SpeedPlan:
    """What runs: the resolved scan backend and the speed options that are on."""
    scan_backend: Optional[str]  # grid, triton, cuda or torch; None for a model without scans
    compile: Optional[bool]  # None: --compile auto, decided by decide_compile once the run's length is known
    cuda_graph: bool
    low_memory: bool
    grad_checkpointing: bool = False
    fused_kernels: bool = False  # GroupMamba's Triton kernels for its convs and norms (CUDA)
    notes: tuple[str, ...] = ()  # why a requested option is off, or on when not asked for

    def describe(self) -> str:
        on = [name for name, flag in (("compiled blocks", self.compile), ("CUDA graphs", self.cuda_graph),
                                      ("fused kernels", self.fused_kernels),
                                      ("low memory", self.low_memory),
                                      ("gradient checkpointing", self.grad_checkpointing)) if flag]
        scan = f"scan backend {self.scan_backend}; " if self.scan_backend else ""
        return scan + (", ".join(on) if on else "eager")

    def optimizer_options(self) -> dict:
        """AdamW options a captured step needs: its state on the GPU, a device-side lr."""
        return dict(fused=True, capturable=True) if self.cuda_graph else {}


def cuda_graph_problem(device: torch.device, distributed: bool, data_parallel: bool,
                       grad_scaling: bool, teacher: bool) -> Optional[str]:
    """Why CUDA-graph capture of train.py's steps cannot be used in this setup, or None."""
    if device.type != "cuda":
        return "it needs a CUDA device"
    if distributed:
        # DDP all-reduces the gradients from hooks inside the backward, so the graph would
        # hold NCCL collectives: capturing those needs NCCL's asynchronous error handling
        # off, and a replay has no timeout of its own
        return ("under torchrun the step's gradient all-reduce would be captured too, which needs NCCL's error "
                "handling off: a rank that failed would leave the others hanging (the compiled blocks still run)")
    if data_parallel:
        return "it runs in a single process on one GPU only"
    if grad_scaling:
        return "fp16's GradScaler synchronises with the host every step (use --amp bf16)"
    if teacher:
        return "distillation runs the teacher outside the captured step"
    return None


_BUILD_CUDA_SCAN = "pip install --no-build-isolation ./kernels/selective_scan"


def resolve_scan_backend(requested: str, device: torch.device) -> str:
    """``kernels.grid_scan.resolve_backend`` for the scripts: a GPU backend that cannot run
    here raises ``BackendUnavailableError`` naming the first cause a user can act on (no
    CUDA GPU, then Triton not installed, then the CUDA extension not built)."""
    if requested not in ("grid", "triton", "cuda"):
        return grid_scan.resolve_backend(requested, device)
    fix = "use --scan-backend auto (or torch)"
    if device.type != "cuda":
        why = ("this machine has no CUDA GPU (torch.cuda.is_available() is False)" if not torch.cuda.is_available()
               else f"the run is on {device.type} (--device)")
        raise BackendUnavailableError(f"scan backend '{requested}' needs a CUDA GPU, and {why}; {fix}")
    if requested in ("grid", "triton") and not grid_scan.HAS_TRITON:
        raise BackendUnavailableError(f"scan backend '{requested}' needs Triton, which is not installed "
                                      f"(pip install 'triton>=3.0'); or {fix}")
    problem = available_backends()["cuda"] if requested == "cuda" else None
    if problem:
        raise BackendUnavailableError(f"scan backend 'cuda' needs the CUDA scan extension, which is not built "
                                      f"or does not load ({problem}); build it with {_BUILD_CUDA_SCAN}, or {fix}")
    return grid_scan.resolve_backend(requested, device)


def plan_speed(config, env, grad_scaling: bool) -> SpeedPlan:
    """The speed options that will run for ``config`` on ``env``'s device. Raises
    ``kernels.selective_scan.BackendUnavailableError`` for a scan backend that cannot run."""
    notes = []
    # resolving imports the scan kernels now: an import inside compiled code breaks the graph
    backend = resolve_scan_backend(config.scan_backend, env.device) if is_groupmamba(config.model) else None
    problem = cuda_graph_problem(env.device, env.distributed, env.data_parallel, grad_scaling,
                                 config.teacher is not None)
    if config.cuda_graph == "on" and problem:
        notes.append(f"--cuda-graph is off: {problem}")
    # auto: wherever a GroupMamba can be captured; other models may sync with the host inside a step
    cuda_graph = problem is None and (config.cuda_graph == "on" or (
        config.cuda_graph == "auto" and is_groupmamba(config.model) and not config.grad_checkpointing))
    compile_ = {"on": True, "off": False}.get(config.compile)  # None: auto, decided later
    if compile_ is not False and env.data_parallel:
        # DataParallel's replicas would call the compiled code bound to the original module
        if compile_:
            notes.append("--compile is off under DataParallel (for several GPUs and compiling, use "
                         "torchrun --nproc_per_node=N)")
        compile_ = False
    fits_without = step_fits(config, False) if env.device.type == "cpu" else None
    grad_checkpointing, note = choose_grad_checkpointing(config.grad_checkpointing, env.device, fits_without)
    notes += [note] if note else []
    if grad_checkpointing and cuda_graph:
        # the recomputation saves and restores the random-number state inside the step
        notes.append("--grad-checkpointing is off: this toolkit does not capture recomputed blocks in "
                     "CUDA graphs (choose one of --grad-checkpointing and --cuda-graph)")
        grad_checkpointing = False
    # the fused kernels halve the activation memory; their launches cost more host time than
    # the ops they replace, so they are on by default only where a CUDA graph replays them
    fused_kernels = (is_groupmamba(config.model) and env.device.type == "cuda" and HAS_TRITON
                     and (cuda_graph or config.low_memory))
    return SpeedPlan(backend, compile_, cuda_graph, config.low_memory, grad_checkpointing, fused_kernels,
                     tuple(notes))


# What compiling costs and saves for a GroupMamba (bench/RESULTS.md): seconds spent
# compiling groupmamba_tiny's training and validation graphs on an H100, by the state of
# the compile cache (2026-12-07: 106 + 47 s cold, 14 + 5 s warm, 25 + 10 s from
# artifacts; later cold runs took 79-140 s), and its training seconds per image, keyed by
# (compiled, CUDA graph): train.py's own loop (--preset fast: 192 px, batch 64, bf16,
# GPU-resident data, Mixup, EMA) on an H100, 2026-12-07: 412 img/s eager, 449 compiled,
# and with a CUDA graph (and so the fused kernels) 1,289 eager, 1,565 compiled; stored
# here scaled to 224 px. Other sizes and models are scaled by pixels and by MODEL_COST; a slower GPU
# saves more per image, so the estimate errs towards eager.
COMPILE_SECONDS = {"cold": 153.0, "warm": 19.0, "artifacts": 34.0}
_AT_192 = (192 / 224) ** 2
SECONDS_PER_IMAGE_224 = {(False, False): 1 / (412 * _AT_192), (False, True): 1 / (1289 * _AT_192),
                         (True, False): 1 / (449 * _AT_192), (True, True): 1 / (1565 * _AT_192)}
# training time per image against tiny's (H200: 1,805 / 1,398 / 897 img/s, 2026-11-29)
MODEL_COST = {"groupmamba_tiny": 1.0, "groupmamba_small": 1.29, "groupmamba_base": 2.01}
VALIDATION_COST = 0.3  # an inference image against a training one (H100: 5,462 against 1,583 img/s)


def compile_estimate(plan: SpeedPlan, model_name: str, img_size: int, images: float,
                     time_limit: Optional[float], cache_state: str) -> tuple[float, float, float]:
    """``(eager seconds, compiled seconds, compile seconds)`` of a run that trains
    ``images`` (validation included as training-image equivalents); under a time limit,
    the images are those eager training would finish in it."""
    scale = MODEL_COST.get(model_name, max(MODEL_COST.values())) * (img_size / 224) ** 2
    eager = SECONDS_PER_IMAGE_224[(False, plan.cuda_graph)] * scale
    compiled = SECONDS_PER_IMAGE_224[(True, plan.cuda_graph)] * scale
    if time_limit is not None:
        images = min(images, time_limit / eager)
    cost = COMPILE_SECONDS[cache_state]
    return images * eager, cost + images * compiled, cost


def decide_compile(plan: SpeedPlan, model_name: str, device: torch.device, img_size: int, images: float,
                   time_limit: Optional[float], cache) -> SpeedPlan:
    """Resolve ``--compile auto`` (``plan.compile`` None): compile a GroupMamba on a GPU
    when the run's estimated time with compiling, the compile itself included, is
    shorter than without. ``cache``: the :class:`utils.compile_cache.CacheState`."""
    if plan.compile is not None:
        return plan
    if device.type != "cuda":
        return replace(plan, compile=False)  # compiling pays on GPUs; a CPU run stays eager quietly
    if not is_groupmamba(model_name):
        return replace(plan, compile=False, notes=plan.notes + (
            f"--compile auto: off, no compile figures for {model_name} (--compile on compiles it)",))
    eager_s, compiled_s, cost = compile_estimate(plan, model_name, img_size, images, time_limit, cache.state)
    on = compiled_s < eager_s
    return replace(plan, compile=on, notes=plan.notes + (
        f"--compile auto: {'on' if on else 'off'}: about {eager_s / 60:.1f} min of steps eager against "
        f"{compiled_s / 60:.1f} min compiled, {cost:.0f} s of compiling included; {cache.describe()}",))


def plan_compile(plan: SpeedPlan, config, env, steps: int, epochs_done: int, val_images: int) -> SpeedPlan:
    """Install the compile cache when the run may compile and resolve ``--compile auto``
    for a run of ``steps`` training steps an epoch from epoch ``epochs_done`` on."""
    if plan.compile is False or (plan.compile is None and env.device.type != "cuda"):
        return decide_compile(plan, config.model, env.device, config.img_size, 0.0, None, None)
    cache = prepare_compile_cache(config.compile_cache, config.resume)
    val = min(val_images / env.world_size, (config.max_val_batches or math.inf) * config.val_batch_size)
    passes = 2 if config.ema_decay else 1  # raw and EMA weights
    images = (config.epochs - epochs_done) * (steps * config.batch_size + passes * val * VALIDATION_COST)
    return decide_compile(plan, config.model, env.device, config.img_size, images, config.time_limit, cache)


def choose_grad_checkpointing(requested: Optional[bool], device: torch.device,
                              fits_without: Optional[bool] = None) -> tuple[bool, Optional[str]]:
    """``(on, a note when on by default)``: what ``--grad-checkpointing`` asks; else, on a
    CPU, on unless the step is known to fit without it (``fits_without``, from
    :func:`utils.memory.step_fits`), and off on a GPU. On a CPU a fp32 step keeps about
    0.32 GiB of activations per 224 px image of groupmamba_tiny (about 21 GiB at the
    default batch 64), 0.12 GiB with checkpointing, for about a quarter more time per step
    (bench/RESULTS.md): worth it only where memory is short. A GPU's default bf16 steps fit
    into its memory, and its speed comes first."""
    if requested is not None:
        return requested, None
    if device.type != "cpu" or fits_without:
        return False, None
    return True, ("gradient checkpointing is on (the CPU default when a step may not fit in memory): "
                  "blocks are recomputed in the backward, for less than half the memory and about a "
                  "quarter more time per step; --no-grad-checkpointing turns it off")


def set_grad_checkpointing(model: torch.nn.Module, plan: SpeedPlan) -> bool:
    """Apply the plan's gradient checkpointing through timm's ``set_grad_checkpointing``;
    False when the plan wants it and the model cannot."""
    if not plan.grad_checkpointing:
        return True
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError):  # timm asserts for models without it
        return False
    return True


def compile_regions(modules, plan: SpeedPlan) -> list[str]:
    """Compile the blocks of each module in place (static shapes: training batches all have
    one size, validation pads its last batch); returns the regions of the last one."""
    functorch_config.activation_memory_budget = LOW_MEMORY_BUDGET if plan.low_memory else 1.0
    regions: list[str] = []
    for module in modules:
        regions = compile_blocks(module, dynamic=False)
    return regions


def cuda_graph_runners(plan: SpeedPlan, model: torch.nn.Module, ema_module: Optional[torch.nn.Module],
                       loss_fn: Callable, optimizer: torch.optim.Optimizer, precision, clip_grad: float):
    """``(captured training step or None, {"model": ..., "ema": ...} evaluation runners)``:
    with CUDA graphs the step and the forwards are captured after their first calls,
    else the plain modules."""
    runners = {"model": model, "ema": ema_module}
    if not plan.cuda_graph:
        return None, runners
    step = CapturedTrainStep(model, loss_fn, optimizer, precision.dtype, precision.enabled,
                             clip_grad if clip_grad > 0 else math.inf)
    return step, {name: None if m is None else CapturedForward(m, precision.dtype, precision.enabled)
                  for name, m in runners.items()}


def compile_blocks(model: torch.nn.Module, **compile_kwargs) -> list[str]:
    """Regional compilation: ``torch.compile`` each repeated block in place.

    Compiling the whole model traces every block separately; compiling each block lets
    blocks of one shape share one compiled graph (parameters are graph inputs), so
    compile time grows with the number of distinct block shapes, not the depth. For
    GroupMamba the regions are the stem, the downsampling layers, the GroupMambaBlocks
    and the ClassBlock; for other timm models the members of ``blocks``/``stages``
    lists, or the whole model when it has neither. In place: state-dict keys do not
    change (no ``_orig_mod.`` prefix), and a copy made later (an EMA) is compiled too.
    Returns the names of the compiled modules.

    Inductor pads every matmul to sizes that are multiples of 8 (``force_shape_pad``)
    unless a compile ``mode`` is given (torch.compile takes a mode or options, not
    both): GroupMamba-T's stage 3 is 348 channels wide, and unpadded, cuBLAS has only
    slow unaligned kernels for those GEMMs (bench/RESULTS.md).
    """
    if compile_kwargs.get("backend", "inductor") == "inductor" and "mode" not in compile_kwargs:
        compile_kwargs["options"] = {"force_shape_pad": True, **compile_kwargs.get("options", {})}
    from models.groupmamba import ClassBlock, Downsample, GroupMambaBlock, Stem
    regions = (GroupMambaBlock, ClassBlock, Stem, Downsample)
    compiled = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer in compiled):
            continue  # inside a region already compiled (e.g. stages.0.blocks.1)
        in_block_list = name.rsplit(".", 1)[-1].isdigit() and name.split(".")[-2:-1] in (["blocks"], ["stages"])
        if isinstance(module, regions) or in_block_list:
            module.compile(**compile_kwargs)
            compiled.append(name)
    if not compiled:
        model.compile(**compile_kwargs)
        compiled.append("")
    return compiled


# torch's dynamo_timed totals: whole-frame compiles (tracing, AOT autograd and the
# forward graphs), the backward graphs (compiled at the first backward) and, inside
# both, the wait for the Triton kernels built in worker processes
_COMPILE_PHASES = {"_compile.compile_inner": "frames",
                   "backward._backward_impl": "backward",
                   "async_compile.wait": "kernel_builds"}


def compile_seconds() -> dict[str, float]:
    """Seconds spent compiling in this process so far, by phase (see _COMPILE_PHASES);
    empty when this torch does not report them."""
    try:
        from torch._dynamo.utils import compile_times
        headers, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # a private API: a torch without it just gets no figures
        return {}
    totals = dict(zip(headers, values))
    return {name: float(totals[key]) for key, name in _COMPILE_PHASES.items() if key in totals}


def describe_compile_seconds(seconds: dict[str, float]) -> str:
    """A log line's worth of :func:`compile_seconds`."""
    if not seconds:
        return "no compile times reported"
    total = seconds.get("frames", 0.0) + seconds.get("backward", 0.0)
    return (f"{total:.1f} s compiling ({seconds.get('frames', 0.0):.1f} s tracing and "
            f"forward graphs, {seconds.get('backward', 0.0):.1f} s backward graphs; "
            f"{seconds.get('kernel_builds', 0.0):.1f} s of it waiting for Triton kernel builds)")
