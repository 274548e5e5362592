"""One run folder, one live run: the lock file train.py keeps in its run folder, and the
clean-up of what an earlier run left there.

The lock (``run.lock``, JSON: pid, host, start time, command) is created with
``O_CREAT | O_EXCL`` by the process that prepares the folder (rank 0 under torchrun; the
other ranks share it) and removed when that process ends the run. A lock whose process
is gone (same host, no such pid) is stale and taken over; a lock from another host
cannot be checked from here, so it is respected until someone deletes it.

A run stopped hard (``kill -9``, power loss) can leave the temporary files of the atomic
writers (``save_checkpoint``, ``atomic_write_text``, the plots); the next run in the
folder removes those, and only those.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from utils.images import leftover_temp_files

LOCK_NAME = "run.lock"
CHECKPOINT_NAMES = ("last.pth", "best.pth")
_held: dict[Path, dict] = {}  # the locks this process holds: path -> what it wrote


# ------------------------------------------------------------------------ the lock

def describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}, "
            f"command: {holder.get('command')}")


def process_is_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def read_lock(lock: Path) -> Optional[dict]:
    """The holder a lock file names; None when the file is gone. A file that stays
    unreadable (not JSON, no pid or host) is an error the user has to look at."""
    reason = ""
    for _ in range(10):  # the holder may be between creating the file and writing it
        try:
            holder = json.loads(lock.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
        else:
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder.get("host"):
                return holder
            reason = "it names no pid and host"
        time.sleep(0.05)
    raise SystemExit(f"error: cannot read the lock file {lock} ({reason}); if no run is using "
                     f"{lock.parent}, delete {lock} and start again")


def refuse_if_held(lock: Path, holder: dict) -> None:
    """SystemExit unless ``holder``'s process is known to be gone."""
    folder = lock.parent
    if holder["host"] != socket.gethostname():
        raise SystemExit(f"error: {folder} is in use by a run on another host ({describe_holder(holder)}); "
                         f"whether it still runs cannot be checked from here: if it has ended, delete {lock} "
                         "and start again")
    # our own pid in a lock we do not hold: an earlier process had it (pids restart in containers)
    earlier_process_with_our_pid = holder["pid"] == os.getpid() and lock not in _held
    alive = not earlier_process_with_our_pid and (os.name == "nt" or process_is_alive(holder["pid"]))
    if alive:  # on Windows os.kill(pid, 0) would signal the process: it cannot be checked
        raise SystemExit(f"error: {folder} is in use by a live run ({describe_holder(holder)}); wait for it to "
                         "end or choose another --output (--force does not replace a live run's files)")


def create_lock(lock: Path, holder: dict) -> None:
    """Create ``lock`` holding ``holder``; FileExistsError when it exists."""
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(holder, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        lock.unlink(missing_ok=True)
        raise


def acquire_run_lock(folder: Path) -> list[str]:
    """Make this process the one run in ``folder``; returns notes for the log (a stale
    lock taken over). SystemExit when a live run, or one that cannot be checked, holds it."""
    lock = Path(folder) / LOCK_NAME
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}
    notes = []
    for _ in range(5):  # each pass either creates the lock or clears a stale one
        try:
            create_lock(lock, mine)
        except FileExistsError:
            pass
        else:
            _held[lock] = mine
            return notes
        holder = read_lock(lock)
        if holder is None:  # its run ended between our two looks
            continue
        refuse_if_held(lock, holder)
        # delete only the stale lock just read, not one a concurrent start has just created
        if read_lock(lock) == holder:
            lock.unlink(missing_ok=True)
            notes.append(f"took over the stale lock {lock}: its run is no longer running "
                         f"({describe_holder(holder)})")
    raise SystemExit(f"error: could not lock {folder}: other runs are starting there at the same time; "
                     "start again when they have")


def release_run_lock(folder: Optional[Path] = None) -> None:
    """Remove the lock this process holds in ``folder`` (None: every lock it holds). A
    lock file that no longer holds what this process wrote is left alone."""
    locks = [p for p in list(_held) if folder is None or p == Path(folder) / LOCK_NAME]
    for lock in locks:
        mine = _held.pop(lock)
        try:
            if json.loads(lock.read_text(encoding="utf-8")) == mine:
                lock.unlink()
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------------ the folder's contents

def refusal(folder: Path, names: list[str]) -> str:
    """Why a non-empty folder is not used, and the ways on; --resume only when possible."""
    last = folder / "last.pth"
    resume = f", continue that run with --resume {last}" if last.is_file() else ""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"error: --output {folder} is not empty ({shown}); choose another --output{resume}, or pass "
            "--force to replace train.py's files in it")


def remove_owned(path: Path) -> None:
    """Remove a file train.py writes; for its TensorBoard folder, the event files in it, and
    the folder when that empties it (anything else there stays)."""
    if path.is_dir() and not path.is_symlink():
        for event_file in path.glob("events.out.tfevents.*"):
            event_file.unlink()
        if not any(path.iterdir()):
            path.rmdir()
    else:
        path.unlink(missing_ok=True)


def clear_run_folder(folder: Path, owned_files: tuple[str, ...], force: bool, resuming_here: bool) -> list[str]:
    """Make the locked ``folder`` ready for this run; returns notes for the log.

    Resuming there keeps everything. A folder with checkpoints or with files train.py does
    not write is used only with ``force``, which replaces ``owned_files``; a folder holding
    nothing but train.py's files and no checkpoint (a run that failed before its first
    one) is re-used as if empty. SystemExit otherwise."""
    notes = []
    leftovers = leftover_temp_files(folder, owned_files)
    names = sorted({p.name for p in folder.iterdir()} - {LOCK_NAME} - {p.name for p in leftovers})
    if names and not resuming_here:
        failed_run = not set(names) & set(CHECKPOINT_NAMES) and set(names) <= set(owned_files)
        if not (force or failed_run):
            raise SystemExit(refusal(folder, names))
        if failed_run:
            notes.append(f"{folder} holds a run that stopped before its first checkpoint; replacing its "
                         f"files ({', '.join(names)})")
        for name in owned_files:
            remove_owned(folder / name)
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        notes.append(f"removed {len(leftovers)} temporary file(s) that an interrupted write left in {folder}: "
                     f"{', '.join(p.name for p in leftovers)}")
    return notes
