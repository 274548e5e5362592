"""Will a training step fit into this machine's memory? train.py's pre-flight check on a CPU.

Without it, a step too big for the machine's memory grows until the kernel kills the
process, after minutes of a machine too busy paging to answer Ctrl-C. The estimate
(:func:`estimate_step_gib`) is calibrated on measured peak RSS of fp32 training steps
(forward, backward, AdamW) with the pure-PyTorch scan: the growth per image at 224 px,
scaled by the token count, ``(img_size / 224) ** 2``; plus the parameters and their
copies (gradients, optimizer state, EMA, checkpoint snapshots), the process itself and
the DataLoader workers; plus a margin. :func:`memory_problem` compares it with what is
available now and says what would fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["CALIBRATIONS", "available_gib", "check_step_memory", "estimate_step_gib", "memory_problem"]

GIB = 2 ** 30


@dataclass(frozen=True)
class StepMemory:
    """A model's calibration: its size and the peak RSS a training image adds at 224 px."""
    params_millions: float
    gib_per_image: float  # all activations kept for the backward
    gib_per_image_checkpointed: float  # block inputs kept, each block recomputed in the backward


# groupmamba_* measured on a CPU (bench/RESULTS.md, "CPU training memory")
CALIBRATIONS = {
    "groupmamba_tiny": StepMemory(23.4, 0.32, 0.121),
    "groupmamba_small": StepMemory(34.8, 0.416, 0.151),
    "groupmamba_base": StepMemory(57.2, 0.683, 0.288),
}
PROCESS_GIB = 0.6  # Python with torch and timm loaded, before the first tensor
WORKER_GIB = 0.15  # a DataLoader worker: its own pages and the batches it decodes
# fp32 weights, gradients, AdamW's two moments, the EMA, and a checkpoint's snapshot of both
STATE_COPIES = 7
MARGIN = 1.15  # allocator slack, validation batches, checkpoint writes
QUICK = {"img_size": 64, "batch_size": 32}  # --preset quick's size, suggested when it fits


def estimate_step_gib(model: str, img_size: int, batch_size: int, grad_checkpointing: bool,
                      workers: int = 0) -> Optional[float]:
    """Peak memory of one training process in GiB, or None for a model without a calibration."""
    calibration = CALIBRATIONS.get(model)
    if calibration is None:
        return None
    per_image = (calibration.gib_per_image_checkpointed if grad_checkpointing
                 else calibration.gib_per_image) * (img_size / 224) ** 2
    fixed = PROCESS_GIB + STATE_COPIES * calibration.params_millions * 1e6 * 4 / GIB + workers * WORKER_GIB
    return MARGIN * (fixed + batch_size * per_image)


def _read_number(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # absent, or "max" (no limit)


def _cgroup_room_bytes() -> Optional[int]:
    """What a container's memory limit leaves (cgroup v2, then v1), or None without a limit."""
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        cap, used = _read_number(Path("/sys/fs/cgroup") / limit), _read_number(Path("/sys/fs/cgroup") / usage)
        if cap is not None and used is not None and cap < 2 ** 60:  # v1 writes "no limit" as ~2**63
            return max(cap - used, 0)
    return None


def available_gib() -> Optional[float]:
    """Memory available to a new allocation now, in GiB: ``MemAvailable`` of /proc/meminfo
    (free memory plus caches the kernel can drop), else free pages; less where a container
    limit leaves less; None when neither can be read."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    room = _cgroup_room_bytes()
    return min(available, room if room is not None else available) / GIB


def _largest_batch(model: str, img_size: int, grad_checkpointing: bool, workers: int, budget: float) -> int:
    """The largest even batch size whose estimate fits ``budget`` GiB (0 when none does)."""
    base = estimate_step_gib(model, img_size, 0, grad_checkpointing, workers)
    per_image = estimate_step_gib(model, img_size, 1, grad_checkpointing, workers) - base
    batch = int((budget - base) // per_image) if budget > base else 0
    return batch - batch % 2


def _largest_img_size(model: str, img_size: int, batch_size: int, grad_checkpointing: bool, workers: int,
                      budget: float) -> int:
    """The largest multiple of 32 px below ``img_size`` whose estimate at ``batch_size`` fits
    ``budget`` GiB (0 when none does)."""
    size = 32 * ((img_size - 1) // 32)
    while size >= 32 and estimate_step_gib(model, size, batch_size, grad_checkpointing, workers) > budget:
        size -= 32
    return max(size, 0)


def _fixes(model: str, img_size: int, batch_size: int, grad_checkpointing: bool, workers: int,
           budget: float) -> list[str]:
    """The changes of a training request that fit ``budget`` GiB, each one alone."""
    fixes = []
    if not grad_checkpointing and estimate_step_gib(model, img_size, batch_size, True, workers) <= budget:
        fixes.append("gradient checkpointing (leave out --no-grad-checkpointing)")
    batch = _largest_batch(model, img_size, grad_checkpointing, workers, budget)
    if batch >= 2:
        fixes.append(f"--batch-size {batch}")
    size = _largest_img_size(model, img_size, batch_size, grad_checkpointing, workers, budget)
    if size >= 32:
        fixes.append(f"--img-size {size}")
    if estimate_step_gib(model, QUICK["img_size"], QUICK["batch_size"], grad_checkpointing, workers) <= budget:
        fixes.append(f"--preset quick ({QUICK['img_size']} px, batch {QUICK['batch_size']})")
    return fixes


def memory_problem(model: str, img_size: int, batch_size: int, grad_checkpointing: bool, workers: int,
                   available: Optional[float], processes: int = 1) -> Optional[str]:
    """None when a training step fits into ``available`` GiB shared by ``processes``
    training processes (or when either side is unknown); else one line: the estimate,
    what is available and what would fit."""
    need = estimate_step_gib(model, img_size, batch_size, grad_checkpointing, workers)
    if need is None or available is None or need * processes <= available:
        return None
    fixes = _fixes(model, img_size, batch_size, grad_checkpointing, workers, available / processes)
    per = f" in each of {processes} processes" if processes > 1 else ""
    todo = ("use " + ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1] if fixes
            else "free some memory or train a smaller model")
    return (f"a training step of {model} at {img_size} px, batch {batch_size} needs about {need:.1f} GiB "
            f"of memory{per} (estimated) and {available:.1f} GiB is available; {todo}")


def step_fits(config, grad_checkpointing: bool) -> Optional[bool]:
    """Whether a CPU training step of ``config`` fits into the available memory (shared by
    torchrun's processes on this machine); None when the model or the memory is unknown."""
    need = estimate_step_gib(config.model, config.img_size, config.batch_size, grad_checkpointing, config.workers)
    available = available_gib()
    if need is None or available is None:
        return None
    return need * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= available


def check_step_memory(config, grad_checkpointing: bool, device) -> None:
    """On a CPU, raise ``SystemExit`` with :func:`memory_problem`'s line before the first
    step that would not fit (torchrun's processes on this machine share its memory)."""
    if device.type != "cpu":
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    problem = memory_problem(config.model, config.img_size, config.batch_size, grad_checkpointing,
                             config.workers, available_gib(), processes)
    if problem:
        raise SystemExit(f"error: {problem}")
