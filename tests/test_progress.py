"""What an epoch shows while it runs (utils.progress): the bar's clock moves before the
first step ends, and a run whose output is not a terminal logs its progress at intervals."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from utils.progress import EpochProgress, ProgressLines, progress_lines

REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _logger() -> tuple[logging.Logger, Records]:
    logger = logging.getLogger(f"progress-test-{time.monotonic_ns()}")
    logger.propagate, records = False, Records()
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    return logger, records


def test_lines_only_when_the_output_is_not_a_terminal():
    logger, _ = _logger()
    assert progress_lines(logger, 30.0, Terminal()) is None
    assert progress_lines(logger, 30.0, io.StringIO()) == ProgressLines(logger, 30.0)


def test_the_bar_shows_at_once_and_its_clock_moves_before_the_first_step_ends():
    screen = Terminal()
    with EpochProgress(4, "epoch 1 train", file=screen) as bar:
        assert "first step running" in screen.getvalue()
        time.sleep(1.5)  # a slow first step: no update yet
        assert "00:01" in screen.getvalue()
        bar.update(32, loss="2.5000")
        assert "img/s" in screen.getvalue() and "loss=2.5000" in screen.getvalue()


def test_lines_say_steps_rate_and_time_left_at_least_every_interval():
    logger, records = _logger()
    with EpochProgress(3, "epoch 2 train", lines=ProgressLines(logger, every_s=0.2), tick_s=0.05) as bar:
        time.sleep(0.3)  # the first step still running: the clock's thread writes the line
        assert records.messages == ["epoch 2 train: 0/3 steps, the first one running for 0 s"]
        bar.update(16, loss="1.2500")
        time.sleep(0.3)  # the next step is slow: again a line from the clock's thread
    line = records.messages[-1]
    assert line.startswith("epoch 2 train: 1/3 steps, ") and " img/s, ETA 00:0" in line and "loss 1.2500" in line
    count = len(records.messages)
    time.sleep(0.3)
    assert len(records.messages) == count  # closed: no more lines


def test_no_lines_from_a_rank_that_does_not_show_progress():
    logger, records = _logger()
    with EpochProgress(2, "val", show=False, lines=ProgressLines(logger, every_s=0.0)) as bar:
        bar.update(8)
    assert records.messages == []


def test_a_piped_training_run_logs_its_progress_in_train_log(tmp_path):
    for part, count in (("train", 4), ("val", 2)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30))):
            (tmp_path / "data" / part / f"class{c}").mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 40), tuple(v + 5 * i for v in colour)).save(
                    tmp_path / "data" / part / f"class{c}" / f"{i}.png")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--data", str(tmp_path / "data"), "--output", str(out), "--model", "test_vit",
         "--img-size", "32", "--batch-size", "2", "--epochs", "1", "--device", "cpu", "--workers", "0",
         "--stats", str(tmp_path / "absent.json"), "--progress-every", "0.001"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (out / "train.log").read_text(encoding="utf-8")
    for desc, total in (("epoch 1 train", 4), ("epoch 1 val", 2), ("report", 2)):
        assert f"{desc}: 1/{total} steps, " in log, desc
    assert " img/s, ETA 00:00" in log
    assert "epoch 1 train: 1/4 steps" in proc.stdout  # the same lines on stdout
