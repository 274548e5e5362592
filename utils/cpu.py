"""How many PyTorch threads and DataLoader workers a run uses: decided once, at start-up,
from the cores this process may use and how busy they are.

Why it matters on a small CPU: PyTorch's threads meet at the end of every operation, so
when another process takes one of their cores, each operation waits for the thread that
is not running. On a 2-core machine beside one busy process, a GroupMamba training step
with 2 threads takes 2.6x as long as with 1 (bench/RESULTS.md). A DataLoader worker
process does the same to the threads when it wakes up, and decoding a batch of small
images costs a few percent of a CPU step, so a small machine loads data in the main
process.

The rule (:func:`plan_cpu`): on a CPU, a core counts as free when it was at least 75 %
idle over a short sample taken at start-up; the run uses at most that many threads plus
workers (at least one thread): no workers up to 2 free cores, else a quarter of them (at
most 4), the rest threads. ``--threads`` / ``OMP_NUM_THREADS`` and ``--workers`` decide
instead when given. Under torchrun the processes of a machine share its cores evenly.
On a GPU the threads stay PyTorch's default (at most the cores) with up to 4 workers.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

__all__ = ["CpuPlan", "busy_cores", "plan_cpu", "usable_cores"]

SAMPLE_S = 0.2      # how long the cores are watched at start-up
FREE_IF_IDLE = 0.75  # a core busy more than a quarter of the time is left to whoever uses it


@dataclass(frozen=True)
class CpuPlan:
    """The threads and workers of a run, and what they were chosen from."""
    threads: int
    workers: int
    cores: int                 # usable by this process (its share under torchrun)
    busy: Optional[float]      # cores busy with other work at start-up; None: not measured
    source: str                # what decided the threads

    def describe(self) -> str:
        workers = f"{self.workers} DataLoader worker{'s' if self.workers != 1 else ''}" if self.workers else \
            "no DataLoader workers"
        busy = f", {self.busy:.1f} busy elsewhere" if self.busy is not None else ""
        return (f"{self.threads} torch thread{'s' if self.threads != 1 else ''} ({self.source}), {workers}; "
                f"{self.cores} core{'s' if self.cores != 1 else ''}{busy}")


def _cgroup_cpu_limit() -> Optional[float]:
    """A container's CPU quota in cores (cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, within a container's quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit)) if limit else cores)


def _busy_ticks(cpus: Optional[set[int]]) -> Optional[int]:
    """Busy clock ticks so far of ``cpus`` (all when None), from /proc/stat; None without it."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        ticks = [int(v) for v in fields[:8]]
        total += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return total


def busy_cores(seconds: float = SAMPLE_S) -> Optional[float]:
    """How many of this process's cores other processes keep busy now, measured over
    ``seconds`` while this one sleeps (from /proc/stat; else the 1-minute load average;
    else None)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = None
    before, start = _busy_ticks(cpus), time.monotonic()
    if before is None:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    time.sleep(seconds)
    after, elapsed = _busy_ticks(cpus), time.monotonic() - start
    return max(0.0, (after - before) / os.sysconf("SC_CLK_TCK") / elapsed)


def _positive_env(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected a whole number of threads, at least 1")
    return int(value)


def plan_cpu(device: str, threads: Optional[int] = None, workers: Optional[int] = None,
             environ: Mapping[str, str] = os.environ, cores: Optional[int] = None,
             busy: Optional[float] = None) -> CpuPlan:
    """The threads and DataLoader workers of a run on ``device`` (``auto``, ``cpu`` or
    ``cuda``); ``threads`` and ``workers`` are the options as given (None: choose).
    ``cores`` and ``busy`` replace the measurements (for tests). Raises ``ValueError`` for
    fewer than 1 thread or 0 workers."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, not {threads}")
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be at least 0, not {workers}")
    env_threads = _positive_env(environ, "OMP_NUM_THREADS")
    asked, source = (threads, "--threads") if threads else (env_threads, "OMP_NUM_THREADS")
    processes = _positive_env(environ, "LOCAL_WORLD_SIZE") or 1  # torchrun's processes on this machine
    cores = max(1, (cores or usable_cores()) // processes)
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return CpuPlan(min(asked or torch.get_num_threads(), cores), min(4, cores) if workers is None else workers,
                       cores, None, source if asked else "PyTorch's default")
    if busy is None and processes == 1 and not (asked and workers is not None):
        busy = busy_cores()  # the processes of one torchrun would count each other
    free = max(1, min(cores, int(cores - (busy or 0.0) + 1 - FREE_IF_IDLE)))
    if workers is None:
        workers = 0 if free <= 2 else min(4, free // 4)
    if asked:
        return CpuPlan(min(asked, cores), workers, cores, busy,
                       source if asked <= cores else f"{source} {asked}, more than the cores")
    return CpuPlan(max(1, free - workers), workers, cores, busy, "free cores")
