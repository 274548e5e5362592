"""What an epoch shows while it runs: a bar on a terminal, plain log lines elsewhere.

The bar (tqdm, on stderr, only when that is a terminal) appears as soon as the pass
starts, says that the first step is running, and its clock moves every second: a CPU
step can take seconds, and a bar that stands still looks like a hung run. After each step
it shows the rate and the time left. When the log does not go to a terminal (a file, a
pipe, a batch job) the same figures go through the run's logger at least every
``every_s`` seconds, so ``train.log`` shows that the run is alive between epoch lines.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional, TextIO

from tqdm import tqdm

__all__ = ["EpochProgress", "ProgressLines", "progress_lines"]

TICK_S = 1.0  # how often the bar's clock moves and a line that is due is written


@dataclass(frozen=True)
class ProgressLines:
    """Plain progress lines through ``logger``, one at least every ``every_s`` seconds."""
    logger: logging.Logger
    every_s: float = 30.0


def progress_lines(logger: logging.Logger, every_s: float,
                   stream: Optional[TextIO] = None) -> Optional[ProgressLines]:
    """Lines when ``stream`` (by default stdout, where the log prints) is not a terminal;
    None on a terminal, where the bar says the same."""
    stream = sys.stdout if stream is None else stream
    is_terminal = getattr(stream, "isatty", None)
    return None if is_terminal is not None and is_terminal() else ProgressLines(logger, every_s)


class EpochProgress:
    """Progress over ``total`` steps: a bar when ``show`` and ``file`` (stderr) is a
    terminal, and ``lines`` when given, written at updates and, every ``tick_s`` seconds,
    by the clock's thread when due; a context manager (closing stops that thread)."""

    def __init__(self, total: int, desc: str, show: bool = True, lines: Optional[ProgressLines] = None,
                 file: Optional[TextIO] = None, tick_s: float = TICK_S):
        self.total, self.desc, self.lines = total, desc, lines if show else None
        self.steps = self.images = 0
        self.figures = ""  # what the last step reported (loss, learning rate), for the lines
        self.start = self.last_line = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, file=file,
                        disable=None if show else True)  # None: only on a terminal (stderr by default)
        self.bar.set_postfix_str("first step running")
        self.tick_s = tick_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._clock = None
        if not self.bar.disable or self.lines is not None:
            self._clock = threading.Thread(target=self._tick, name="epoch-progress", daemon=True)
            self._clock.start()

    def __enter__(self) -> "EpochProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, images: int, **figures: str) -> None:
        """One more step, of ``images`` images; ``figures`` are shown beside the bar."""
        with self._lock:
            self.steps += 1
            self.images += images
            self.figures = ", ".join(f"{k} {v}" for k, v in figures.items())
            rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix({**figures, "img/s": f"{rate:.1f}"}, refresh=False)
        self.bar.update(1)
        self._log_if_due()

    def line(self) -> str:
        """The progress as one line: steps done, img/s, time left."""
        elapsed = time.perf_counter() - self.start
        if not self.steps:
            return f"{self.desc}: 0/{self.total} steps, the first one running for {elapsed:.0f} s"
        left = elapsed / self.steps * (self.total - self.steps)
        figures = f", {self.figures}" if self.figures else ""
        return (f"{self.desc}: {self.steps}/{self.total} steps, {self.images / elapsed:.1f} img/s, "
                f"ETA {tqdm.format_interval(left)}{figures}")

    def _log_if_due(self) -> None:
        if self.lines is None:
            return
        with self._lock:
            now = time.perf_counter()
            if now - self.last_line < self.lines.every_s:
                return
            self.last_line = now
            text = self.line()
        self.lines.logger.info(text)

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.bar.refresh()
            self._log_if_due()

    def close(self) -> None:
        self._stop.set()
        if self._clock is not None:
            self._clock.join()
        self.bar.close()
