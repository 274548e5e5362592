"""The run folder: one live run at a time (run.lock), a failed run's folder re-used, the
temporary files of interrupted atomic writes cleared, and the advice a refusal gives.

Most checks call prepare_run_folder in this process with a small configuration; one
tiny training run (interrupted in this process, then re-run as a subprocess) covers
train.py itself.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from subprocesses import load_script
from test_train_test import TINY, _make_source, ok, output, run
from utils import checkpoint, images, report
from utils.checkpoint import prepare_run_folder
from utils.images import temp_file_pattern
from utils.run_folder import LOCK_NAME, acquire_run_lock, release_run_lock

OWNED = ("args.json", "train.log", "metrics.csv", "curves.png", "last.pth", "best.pth", "report.txt")


@pytest.fixture(autouse=True)
def no_lock_left_held():
    yield
    release_run_lock()  # a failed check must not leave the next one a lock of ours


def config(out: Path, force: bool = False, resume: Path | None = None) -> SimpleNamespace:
    return SimpleNamespace(output=str(out), resume=str(resume) if resume else None, force=force)


def write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                "started": "2030-01-02T03:04:05+00:00", "command": "train.py --output x"}))
    return lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def refused(cfg) -> str:
    with pytest.raises(SystemExit) as info:
        prepare_run_folder(cfg, OWNED)
    assert isinstance(info.value.code, str) and info.value.code.startswith("error: ")
    assert "\n" not in info.value.code
    return info.value.code


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ----------------------------------------------------------------------- the lock

def test_a_live_run_is_not_replaced_even_with_force(tmp_path):
    out = tmp_path / "run"
    lock = write_lock(out, os.getppid())  # a process that is certainly running
    (out / "last.pth").write_bytes(b"the live run's checkpoint")
    (out / "train.log").write_text("the live run's log")
    before = snapshot(out)
    message = refused(config(out, force=True))
    assert f"pid {os.getppid()} on host {socket.gethostname()}" in message
    assert "2030-01-02T03:04:05+00:00" in message and "live run" in message
    assert snapshot(out) == before and lock.exists()
    # nor by a second --resume of the same run
    assert "live run" in refused(config(out, resume=out / "last.pth"))
    assert snapshot(out) == before


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "run"
    pid = dead_pid()
    write_lock(out, pid)
    folder, notes = prepare_run_folder(config(out), OWNED)
    assert folder == out
    assert len(notes) == 1 and "stale lock" in notes[0] and f"pid {pid}" in notes[0]
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["started"] and holder["command"]
    release_run_lock()
    assert not (out / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_respected(tmp_path):
    out = tmp_path / "run"
    lock = write_lock(out, dead_pid(), host="elsewhere.example")
    message = refused(config(out, force=True))
    assert "another host" in message and "elsewhere.example" in message
    assert f"delete {lock}" in message and lock.exists()


def test_an_unreadable_lock_is_reported(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("{not json")
    message = refused(config(out))
    assert "cannot read the lock file" in message and f"delete {out / LOCK_NAME}" in message


def test_one_lock_per_folder_and_only_its_holder_removes_it(tmp_path):
    acquire_run_lock(tmp_path)
    with pytest.raises(SystemExit, match="live run"):
        acquire_run_lock(tmp_path)  # held by this very process
    lock = write_lock(tmp_path, os.getppid())  # replaced by someone else meanwhile
    release_run_lock()
    assert lock.exists()


def test_a_refused_folder_is_left_unlocked(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "is not empty (notes.txt)" in refused(config(out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------- what an earlier run left

def test_a_failed_run_folder_is_reused_without_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "train.log").write_text("error: out of memory")
    _, notes = prepare_run_folder(config(out), OWNED)
    assert any("stopped before its first checkpoint" in n and "args.json, train.log" in n for n in notes)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_the_advice_names_resume_only_when_last_pth_exists(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pth").write_bytes(b"weights")
    (out / "notes.txt").write_text("mine")
    message = refused(config(out))
    assert "--resume" not in message and "--force" in message
    (out / "last.pth").write_bytes(b"weights")
    assert f"--resume {out / 'last.pth'}" in refused(config(out))
    # --force replaces train.py's files only
    prepare_run_folder(config(out, force=True), OWNED)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", LOCK_NAME]


def test_leftover_temporary_files_are_removed_and_reported(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"checkpoint")
    leftovers = [".last.pth.k2_x9abc.tmp", ".args.json.0a1b2c3d.tmp", ".curves.png.tmp.png"]
    lookalikes = [".last.pth.abc.tmp", ".notes.txt.abcdefgh.tmp", ".last.pth.ABCDEFGH.tmp",
                  "last.pth.abcdefgh.tmp", ".last.pth.abcdefgh.tmp.bak", "mine.tmp"]
    for name in leftovers + lookalikes:
        (out / name).write_text("x")
    (out / ".best.pth.abcdefgh.tmp").mkdir()  # a folder: not a writer's file
    _, notes = prepare_run_folder(config(out, resume=out / "last.pth"), OWNED)
    assert len(notes) == 1 and "removed 3 temporary file(s)" in notes[0]
    assert all(name in notes[0] for name in leftovers)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        lookalikes + ["last.pth", ".best.pth.abcdefgh.tmp", LOCK_NAME])


def test_the_pattern_matches_what_the_atomic_writers_create(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    checkpoint.save_checkpoint({"x": 1}, tmp_path / "last.pth")
    images.atomic_write_json(tmp_path / "args.json", {"x": 1})
    report.plot_curves([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_acc1": 1.0, "val_acc1": 1.0}],
                       tmp_path / "curves.png")
    pattern = temp_file_pattern(OWNED)
    assert [dst for _, dst in seen] == ["last.pth", "args.json", "curves.png"]
    assert all(pattern.fullmatch(src) for src, _ in seen), seen


# ----------------------------------------------------------------------- train.py

@pytest.fixture
def data(tmp_path) -> Path:
    source = _make_source(tmp_path / "images", per_class=12)
    for cls in sorted(p.name for p in source.iterdir()):
        files = sorted((source / cls).iterdir())
        for part, chunk in (("train", files[:8]), ("val", files[8:])):
            (tmp_path / "data" / part / cls).mkdir(parents=True)
            for f in chunk:
                shutil.copy(f, tmp_path / "data" / part / cls / f.name)
    return tmp_path / "data"


def test_train_locks_its_folder_and_a_failed_run_is_reused(data, tmp_path, monkeypatch, capsys):
    """Interrupted before its first checkpoint (in this process), then run again in the
    same folder without --force (a subprocess): the lock is there while it trains and
    gone after either end."""
    out = tmp_path / "run"
    args = ["--data", data, "--output", out, "--epochs", "1", "--max-train-batches", "1",
            "--max-val-batches", "1", "--check-images", "none", *TINY]
    train_script = load_script("train")
    holders = []

    def interrupted(*a, **k):
        holders.append(json.loads((out / LOCK_NAME).read_text())["pid"])
        raise KeyboardInterrupt

    monkeypatch.setattr(train_script, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as stopped:
        train_script.main([str(a) for a in args])
    assert stopped.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert holders == [os.getpid()]
    assert {"args.json", "train.log"} <= {p.name for p in out.iterdir()}
    assert not (out / LOCK_NAME).exists() and not (out / "last.pth").exists()

    proc = ok(run("train.py", *args))
    assert "stopped before its first checkpoint" in output(proc)
    assert (out / "last.pth").is_file() and (out / "best.pth").is_file()
    assert not (out / LOCK_NAME).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
