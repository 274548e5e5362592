"""Single process, DataParallel or DistributedDataParallel: one object says which.

How train.py runs on several devices:

* ``python train.py ...`` with one visible GPU (or ``--device cpu``): one process,
  no wrapper.
* ``python train.py ...`` with several visible GPUs: one process,
  ``torch.nn.DataParallel`` over all of them; ``--batch-size`` is the total batch,
  split across the GPUs. Restrict the GPUs with ``CUDA_VISIBLE_DEVICES``.
* ``torchrun --nproc_per_node=N train.py ...``: N processes,
  ``DistributedDataParallel`` (NCCL on CUDA, Gloo on CPU), one GPU per process;
  ``--batch-size`` is per process, so the global batch is N x --batch-size. Only rank
  0 prints, shows progress bars and writes files; metrics are summed over all ranks.

``setup_distributed`` reads the variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, TORCHELASTIC_ERROR_FILE) and returns a ``DistEnv``; everything else here
takes that object.

Waiting on other ranks, and how long:

* the training collectives (DDP's gradient all-reduce, the summed metrics) run on the
  default process group with :data:`COLLECTIVE_TIMEOUT`: there the ranks move in step,
  so a long wait means a rank died or hangs;
* waits for rank 0 alone (the image check of a large data set, checkpoint writes,
  settings it decides for all) run on a second group of the same backend with
  :data:`MAIN_WAIT_TIMEOUT` (the same backend: no other network setup to get right).

A rank that fails ends the whole run: torchrun stops the others (on other machines they
fail at once on the broken connection, at the latest after a timeout). Its last words
name it (:func:`failures_named`): the one-line error says ``rank R``, a rank that lost
contact says so instead of printing a traceback, and the failure goes into torchrun's
error file, so torchrun's summary shows what failed beside the rank.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from utils.errors import failure_message
from utils.images import atomic_write_text

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # NCCL's own default, now for Gloo too
MAIN_WAIT_TIMEOUT = datetime.timedelta(hours=2)
# what a collective raises on a rank whose peer has gone (Gloo's and NCCL's wordings)
_LOST_CONTACT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                 "remote process exit", "ncclRemoteError")


@dataclass
class DistEnv:
    """Where this process runs and how it talks to the others."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False   # started by torchrun with WORLD_SIZE > 1
    data_parallel: bool = False  # one process driving several GPUs
    main_group: Any = None  # the group of the waits for rank 0 (None: the default group)
    error_file: Optional[str] = None  # where torchrun reads this process's failure

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def mode(self) -> str:
        if self.distributed:
            return f"DistributedDataParallel ({dist.get_backend()}, {self.world_size} processes)"
        if self.data_parallel:
            return f"DataParallel ({torch.cuda.device_count()} GPUs)"
        return "single process"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda was asked for but no CUDA GPU is "
                             "visible to PyTorch (use --device cpu or auto)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def started_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup_distributed(device_name: str = "auto", allow_data_parallel: bool = True) -> DistEnv:
    """Initialise the process group when started by torchrun; pick the device."""
    if started_by_torchrun():
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name, local_rank)
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise SystemExit(
                    f"error: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                    "GPU(s) are visible; use --nproc_per_node <= the GPU count")
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                                    **({"device_id": device} if backend == "nccl" else {}))
        return DistEnv(device=device, rank=rank, world_size=world_size, local_rank=local_rank, distributed=True,
                       main_group=dist.new_group(timeout=MAIN_WAIT_TIMEOUT),
                       error_file=os.environ.get("TORCHELASTIC_ERROR_FILE"))
    device = resolve_device(device_name)
    data_parallel = (allow_data_parallel and device.type == "cuda"
                     and torch.cuda.device_count() > 1)
    return DistEnv(device=device, data_parallel=data_parallel)


def cleanup_distributed(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP, DataParallel or the model itself, according to ``env``."""
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if env.data_parallel:
        return nn.DataParallel(model)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP/DataParallel (and torch.compile) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sums(values: Sequence[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over all ranks (identity in a single process)."""
    if not env.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank (also what every rank must decide alike: the best
    epoch, whether to stop)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=env.main_group)
    return box[0]


def run_on_main(fn: Callable[[], Any], env: DistEnv,
                errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> Any:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    An expected error on rank 0 (``errors``, or SystemExit) is re-raised on every rank
    as ``SystemExit`` with the same message, so no rank waits forever for the others.
    """
    result, message = None, None
    if env.is_main:
        try:
            result = fn()
        except SystemExit as exc:
            message = str(exc.code) if exc.code not in (None, 0) else "stopped"
        except errors as exc:  # the same line the script's own error path would print
            message = f"error: {failure_message(exc, errors) or exc}"
    if env.distributed:
        result, message = broadcast_object((result, message), env)
    if message is not None:
        raise SystemExit(message)
    return result


def barrier(env: DistEnv) -> None:
    """Wait for every rank (rank 0 may be writing files: the long timeout)."""
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        dist.barrier(group=env.main_group, device_ids=ids)


def lost_contact(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process of the run has gone."""
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _LOST_CONTACT)


def record_failure(env: DistEnv, message: str) -> None:
    """``message`` (a line or a traceback) in torchrun's error file, whose summary then
    shows it for this rank (the file's format is torch.distributed.elastic's)."""
    if not env.error_file:
        return
    entry = {"message": message.strip().splitlines()[-1],
             "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
    try:
        atomic_write_text(env.error_file, json.dumps({"message": entry}))
    except OSError:  # the summary then has no message; the rank's own output still does
        pass


@contextmanager
def failures_named(env: DistEnv) -> Iterator[None]:
    """Under torchrun, the way a rank fails says which rank it is (see the module's docstring):
    a one-line error (``SystemExit`` with a message) gets ``rank R`` and goes to torchrun's
    error file, a lost connection becomes one line, anything else keeps its traceback and
    goes to the error file as it is."""
    if not env.distributed:
        yield
        return
    try:
        yield
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        raise _named_exit(env, exc.code.removeprefix("error: ")) from None
    except Exception as exc:
        if lost_contact(exc):
            raise _named_exit(env, f"lost contact with the other processes ({_first_sentence(exc)}); another rank "
                                   "stopped first: its error, or torchrun's summary on its machine, says why") from None
        record_failure(env, traceback.format_exc())
        raise


def _first_sentence(exc: BaseException) -> str:
    """The gist of a backend's message: its first sentence, without a ``[source:line]`` prefix."""
    text = str(exc).strip().splitlines()[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0]


def _named_exit(env: DistEnv, message: str) -> SystemExit:
    line = f"error: rank {env.rank} (of {env.world_size}): {message}"
    record_failure(env, line)
    return SystemExit(line)


class ShardSampler(torch.utils.data.Sampler):
    """Every sample exactly once across ranks (rank r takes positions r, r + world, ...),
    unlike DistributedSampler, which pads with duplicates: exact evaluation metrics.

    With ``seed`` the order is a fixed permutation (the same every epoch), so a pass cut
    short (train.py --max-val-batches) still sees every class, not the first few."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1,
                 seed: int | None = None):
        self.length, self.rank, self.world_size = int(length), int(rank), int(world_size)
        if seed is None:
            self.order = list(range(self.length))
        else:
            gen = torch.Generator().manual_seed(int(seed))
            self.order = torch.randperm(self.length, generator=gen).tolist()

    def __iter__(self):
        return iter(self.order[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
