"""Ctrl-C during a run: the first one stops it, a second one exits at once.

Python runs a signal handler between bytecodes of the main thread, so the first Ctrl-C
takes effect once the native operation running then returns; a CPU training step runs
Python code all along (the scan's backward, the checkpointed blocks' recomputation), so
that is a fraction of a second. The run then unwinds as from any ``KeyboardInterrupt``;
checkpoints are written atomically, so ``last.pth`` is either the previous one or the new
one. A second Ctrl-C does not wait for that (or for the interpreter's exit): it ends the
process at once.
DataLoader workers ignore SIGINT (a terminal sends it to the whole process group): the
main process alone decides, and its exit stops them.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["INTERRUPTED_EXIT_CODE", "SigintHandler", "ignore_sigint", "raise_if_interrupted", "stop_on_sigint"]

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports for a process ended by Ctrl-C


_requested = False  # a Ctrl-C arrived while stop_on_sigint's handler was installed


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when a Ctrl-C arrived: the handler's own exception can be
    swallowed where it lands in a ``__del__`` (e.g. a DataLoader shutting its workers down,
    reported as "Exception ignored in ..."); the training loop calls this every step."""
    if _requested:
        raise KeyboardInterrupt


class SigintHandler:
    """A SIGINT handler: ``KeyboardInterrupt`` the first time, ``os._exit`` the second."""

    def __init__(self):
        self.count = 0

    def __call__(self, signum, frame) -> None:
        global _requested
        _requested = True
        self.count += 1
        if self.count > 1:
            # no clean-up: the first interrupt's is what is taking too long
            os.write(2, b"\ninterrupted again: exiting now\n")
            os._exit(INTERRUPTED_EXIT_CODE)
        raise KeyboardInterrupt


@contextmanager
def stop_on_sigint() -> Iterator[None]:
    """Install :class:`SigintHandler` for the block (main thread only; elsewhere nothing
    changes, as signal handlers can only be set there), then restore the previous one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _requested
    _requested = False
    previous = signal.signal(signal.SIGINT, SigintHandler())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested = False


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave Ctrl-C to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
