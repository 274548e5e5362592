"""How the scripts end on a failure a user can act on: one line that says what happened,
which path, and what to do, and a non-zero exit. Anything else is a bug and keeps its
traceback.

Every script's ``main`` ends the same way::

    except Exception as exc:
        exit_if_known(exc, prefix="error: ", known=(DatasetError, ...), memory_hint=...)
        raise

The mapping (:func:`failure_message`) knows three kinds of failure besides the script's
own ``known`` errors (whose message is already written for a user):

- out of memory: ``torch.cuda.OutOfMemoryError``, CPU allocation failures (a
  ``RuntimeError`` from torch's ``DefaultCPUAllocator``) and ``MemoryError``;
- a full disk, a read-only file system, a path that is a folder, no permission: an
  ``OSError`` with one of :data:`DISK_PROBLEMS`' errno values, found anywhere in the
  exception's ``__cause__``/``__context__`` chain (``torch.save`` wraps them in a
  ``RuntimeError``);
- a selective-scan backend that cannot run here (its message says why).

:func:`setup_logging` sends a script's log to the console and, from the main process, to
a :class:`LogFile` that survives a full disk.

No torch import at module level: mean_std.py and makedata.py start without torch.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Iterator, NoReturn, Optional

__all__ = ["DISK_PROBLEMS", "LogFile", "UsageError", "disk_error", "exit_if_known", "failure_message",
           "reraise_with_path"]

# errno -> (what happened, what to do); files are written atomically, so what was there stays
DISK_PROBLEMS = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    getattr(errno, "EDQUOT", errno.ENOSPC): ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "write to a writable folder"),
    errno.EACCES: ("permission denied", "use a folder you can write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "use a folder you can write to, or change its permissions"),
    errno.EISDIR: ("it is a folder", "give a file name"),
}

# what torch's CPU allocator says when malloc fails (Linux and Windows wordings)
_CPU_ALLOCATION_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


class UsageError(ValueError):
    """Arguments or files that a script cannot work with; the message says why and what to do."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_error(exc: BaseException) -> Optional[OSError]:
    """The first ``OSError`` in ``exc``'s chain whose errno is one of :data:`DISK_PROBLEMS`."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in DISK_PROBLEMS), None)


def reraise_with_path(exc: BaseException, path: str | os.PathLike) -> NoReturn:
    """Re-raise a failed write of ``path``: a disk problem becomes an ``OSError`` naming
    ``path`` (not the temporary file, nor no file at all), anything else as it was."""
    found = disk_error(exc)
    if found is None or (found.filename2 or found.filename) == os.fspath(path):
        raise exc
    raise OSError(found.errno, found.strerror or os.strerror(found.errno), os.fspath(path)) from exc


def _is_out_of_memory(exc: BaseException) -> Optional[str]:
    """``"GPU"`` or ``"CPU"`` when ``exc`` is an allocation failure, else None."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return "GPU"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                        and any(text in str(exc) for text in _CPU_ALLOCATION_FAILURES)):
        return "CPU"
    return None


def _is_backend_unavailable(exc: BaseException) -> bool:
    kernels = sys.modules.get("kernels.selective_scan")
    return kernels is not None and isinstance(exc, kernels.BackendUnavailableError)


def failure_message(exc: BaseException, known: tuple[type[BaseException], ...] = (),
                    memory_hint: str = "lower --batch-size") -> Optional[str]:
    """The one line for a failure a user can act on, None for anything else (a bug).

    ``known``: the script's own error types, whose messages are shown as they are;
    ``memory_hint``: what to do when memory runs out (the options of that script).
    """
    found = disk_error(exc)
    # a known error raised from a disk problem has the better message; a known type as
    # broad as OSError does not
    if (isinstance(exc, known) and found is not exc) or _is_backend_unavailable(exc):
        return _without_worker_traceback(str(exc))
    if found is not None:
        what, todo = DISK_PROBLEMS[found.errno]
        path = found.filename2 or found.filename  # a copy's or a rename's second path is the one written
        where = f"{path}: " if path else ""
        return f"{where}{what}; {todo} (files already there are unchanged)"
    device = _is_out_of_memory(exc)
    if device is not None:
        return f"out of {device} memory; {memory_hint}"
    return None


def _without_worker_traceback(message: str) -> str:
    """A DataLoader worker's error comes back with the worker's traceback in its message:
    keep the original message (its last line, without the exception's type)."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def exit_if_known(exc: BaseException, prefix: str = "error: ", code: int = 1,
                  known: tuple[type[BaseException], ...] = (), memory_hint: str = "lower --batch-size") -> None:
    """Exit with ``code`` and ``prefix`` + :func:`failure_message` on stderr when ``exc`` is
    a known failure; return (so that the caller re-raises) when it is not."""
    message = failure_message(exc, known, memory_hint)
    if message is None:
        return
    line = prefix + " ".join(message.split())  # one line, whatever the message holds
    if code == 1:
        raise SystemExit(line) from None  # Python prints it to stderr and exits with 1
    print(line, file=sys.stderr)
    raise SystemExit(code) from None


class LogFile(logging.FileHandler):
    """A log file that, once it cannot be written (a full disk), says so in one line and
    stops, where ``logging`` would print a traceback for every record."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if exc is None or disk_error(exc) is None:
            super().handleError(record)
            return
        what = DISK_PROBLEMS[disk_error(exc).errno][0]
        print(f"warning: cannot write {self.baseFilename} ({what}); the log goes to the console only",
              file=sys.stderr)
        self.setLevel(logging.CRITICAL + 1)  # nothing more for this file


def setup_logging(logger: logging.Logger, is_main: bool, log_file: Optional[str | os.PathLike] = None) -> None:
    """``logger`` writes time-stamped lines to stdout and, on the main process, to
    ``log_file``; the other processes of a distributed run log warnings only."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and is_main:
        handlers.append(LogFile(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
