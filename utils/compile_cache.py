"""Where ``torch.compile`` keeps what it built, so that the next run starts at once.

Inductor caches its FX graphs, AOTAutograd graphs and Triton kernels in one folder
(``TORCHINDUCTOR_CACHE_DIR``); torch's default is under ``/tmp``, which a reboot or a
fresh container empties. train.py points it at a folder that lasts (:func:`use_cache_dir`,
``--compile-cache``) and, after a compiled first epoch, writes torch's portable cache
artifacts beside the run (``compile_cache.bin``): a run resumed from that folder, on this
machine or another one with the same GPU and software, loads them before compiling.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from utils.images import atomic_replace

__all__ = ["ARTIFACTS_FILE", "DEFAULT_COMPILE_CACHE", "CacheState", "cache_is_warm", "load_artifacts",
           "prepare_compile_cache", "resolve_cache_dir", "save_artifacts", "use_cache_dir"]

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
DEFAULT_COMPILE_CACHE = "~/.cache/groupmamba/torch-compile"  # under $XDG_CACHE_HOME when that is set
ARTIFACTS_FILE = "compile_cache.bin"


@dataclass(frozen=True)
class CacheState:
    """The compile cache a run starts with: its folder and what it holds."""
    folder: Path
    state: str  # "cold" (nothing compiled there yet), "warm" or "artifacts" (loaded from a run folder)
    source: str = ""  # the artifacts file, when loaded

    def describe(self) -> str:
        if self.state == "artifacts":
            return f"compile cache {self.folder}, filled from {self.source}"
        return f"compile cache {self.folder} {'is empty' if self.state == 'cold' else 'holds compiled graphs'}"


def resolve_cache_dir(flag: Optional[str], environ: Mapping[str, str] = os.environ) -> Path:
    """``--compile-cache``, else ``$TORCHINDUCTOR_CACHE_DIR``, else the default under
    ``$XDG_CACHE_HOME`` (or ``~/.cache``)."""
    if flag:
        return Path(flag).expanduser().resolve()
    if environ.get(INDUCTOR_CACHE_ENV):
        return Path(environ[INDUCTOR_CACHE_ENV]).expanduser().resolve()
    base = environ.get("XDG_CACHE_HOME") or "~/.cache"
    return (Path(base).expanduser() / "groupmamba" / "torch-compile").resolve()


def use_cache_dir(folder: Path) -> None:
    """Point inductor (and the Triton cache inside it) at ``folder``; before the first
    compile. An unusable folder raises ``OSError`` naming it."""
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"the compile cache folder {folder} is not writable (choose another with "
                              "--compile-cache DIR)")
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)  # torch's own setting, read when it compiles


def cache_is_warm(folder: Path) -> bool:
    """Whether an earlier run compiled graphs into ``folder`` (inductor's FX-graph cache)."""
    graphs = folder / "fxgraph"
    return graphs.is_dir() and any(graphs.iterdir())


def load_artifacts(path: Path) -> bool:
    """Load torch's portable cache artifacts from ``path`` into the current cache; False
    when this torch cannot read them (another version: the run compiles as usual)."""
    try:
        return torch.compiler.load_cache_artifacts(path.read_bytes()) is not None
    except (RuntimeError, ValueError, EOFError, KeyError) as exc:  # torch raises several kinds here
        print(f"warning: {path} could not be loaded ({exc.__class__.__name__}: {exc}); compiling anew",
              flush=True)
        return False


def save_artifacts(path: Path) -> int:
    """Write the portable artifacts of what this process compiled (or loaded) to ``path``
    atomically; the bytes written, 0 when there is nothing to save."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        return 0
    with atomic_replace(path) as tmp:
        tmp.write_bytes(saved[0])
    return len(saved[0])


def prepare_compile_cache(flag: Optional[str], resume: Optional[str]) -> CacheState:
    """Choose and install the cache folder; load ``compile_cache.bin`` from the folder of
    a ``--resume`` checkpoint when it is there."""
    folder = resolve_cache_dir(flag)
    use_cache_dir(folder)
    artifacts = Path(resume).parent / ARTIFACTS_FILE if resume else None
    if artifacts is not None and artifacts.is_file() and load_artifacts(artifacts):
        return CacheState(folder, "artifacts", str(artifacts))
    return CacheState(folder, "warm" if cache_is_warm(folder) else "cold")


def keep_artifacts(path: Path) -> str:
    """Save the portable artifacts to ``path``; a log line saying what was kept."""
    try:
        size = save_artifacts(path)
    except OSError as exc:  # a full disk costs the next run its head start, not this run
        return f"the compile cache artifacts were not saved: {exc}"
    if not size:
        return "no compile cache artifacts to save"
    return (f"compile cache artifacts: {size / 2**20:.0f} MB in {path} (a run resumed from this folder loads "
            "them, also on another machine with the same GPU and software)")
