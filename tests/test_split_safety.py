"""makedata.py --force replaces only a split it made, and nothing else in it (CPU, seconds)."""

from __future__ import annotations

import json
import os

import pytest

import makedata
from tests.test_data_scripts import DATA1, _tiny_source, leftovers, run_script, snapshot

COUNTS = {"Maize": 4, "Wheat": 3}


@pytest.fixture
def src(tmp_path):
    return _tiny_source(tmp_path, COUNTS)


def _split(src, dst, *extra):
    return makedata.main(["--src", str(src), "--dst", str(dst), "--no-progress",
                          *map(str, extra)])


def _refused(src, dst, *extra) -> str:
    """Run makedata.py --force as a user would; assert it fails cleanly and leaves
    ``dst`` byte for byte as it was; return its error message."""
    before = snapshot(dst)
    res = run_script("makedata.py", "--src", src, "--dst", dst, "--force",
                     "--no-progress", *extra)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr   # one line
    assert snapshot(dst) == before
    assert leftovers(dst.parent) == []
    return res.stderr


def test_force_refuses_hidden_entries_and_user_files(src, tmp_path):
    dst = tmp_path / "D"
    (dst / "train" / "Mine").mkdir(parents=True)
    (dst / ".git").mkdir()
    (dst / ".env").write_text("x\n")
    mine = dst / "train" / "Mine" / "my_only_copy.jpg"
    mine.write_bytes(next((DATA1 / "Maize").iterdir()).read_bytes())
    message = _refused(src, dst)
    assert "no split.json" in message
    for entry in (".env", ".git/", "train/Mine/my_only_copy.jpg"):
        assert entry in message
    assert "move it away or choose another --dst" in message


def test_force_refuses_hidden_file_at_top_level(src, tmp_path):
    dst = tmp_path / "data"
    assert _split(src, dst) == 0
    (dst / ".env").write_text("API_KEY=secret\n")
    message = _refused(src, dst)
    assert "did not write" in message and ": .env;" in message
    assert "move those out of" in message


def test_force_refuses_extra_file_in_val_class(src, tmp_path):
    dst = tmp_path / "data"
    assert _split(src, dst) == 0
    (dst / "val" / "Maize" / "extra.jpg").write_bytes(b"mine")
    message = _refused(src, dst)
    assert "val/Maize/extra.jpg" in message and "train/" not in message


def test_force_refuses_split_json_without_marker(src, tmp_path):
    dst = tmp_path / "data"
    assert _split(src, dst) == 0
    record = json.loads((dst / "split.json").read_text())
    del record["made_by"]
    (dst / "split.json").write_text(json.dumps(record))
    message = _refused(src, dst)
    assert '"made_by"' in message and "older makedata.py" in message
    assert f"delete {dst} yourself" in message
    assert "split.json, train/ (" in message      # what it holds, folders summarised

    (dst / "split.json").write_text("{ not json")
    assert "not readable JSON" in _refused(src, dst)
    (dst / "split.json").write_text(json.dumps({**record, "made_by": "makedata.py",
                                                "format": 1}))
    assert "not format 2" in _refused(src, dst)


def test_force_replaces_own_split(src, tmp_path):
    dst = tmp_path / "data"
    assert _split(src, dst, "--seed", "1") == 0
    record = json.loads((dst / "split.json").read_text())
    assert record["made_by"] == "makedata.py" and record["format"] == 2
    on_disk = {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()}
    assert record["files"] == sorted(on_disk - {"split.json"})
    os.remove(dst / record["files"][0])           # a listed file gone: nothing to lose
    assert _split(src, dst, "--seed", "2", "--force") == 0
    assert json.loads((dst / "split.json").read_text())["seed"] == 2
    assert len(list(dst.rglob("*.jpg"))) == sum(COUNTS.values())
    assert leftovers(tmp_path) == []


def test_force_replaces_own_symlink_split(src, tmp_path):
    dst = tmp_path / "data"
    assert _split(src, dst, "--link", "symlink") == 0
    assert all(p.is_symlink() for p in dst.rglob("*.jpg"))
    assert _split(src, dst, "--force", "--seed", "5") == 0
    assert not any(p.is_symlink() for p in dst.rglob("*.jpg"))
    assert all(p.is_file() for p in src.rglob("*.jpg"))   # link targets untouched


def test_force_checks_again_before_the_swap(src, tmp_path, monkeypatch):
    dst = tmp_path / "data"
    assert _split(src, dst) == 0
    real_build = makedata.build_split

    def build_while_user_adds_a_file(*args, **kwargs):
        real_build(*args, **kwargs)
        (dst / "notes.txt").write_text("written during the build\n")
    monkeypatch.setattr(makedata, "build_split", build_while_user_adds_a_file)
    before = snapshot(dst)
    with pytest.raises(SystemExit, match="notes.txt"):
        _split(src, dst, "--force", "--seed", "9")
    after = snapshot(dst)
    assert after.pop("notes.txt") == b"written during the build\n"
    assert after == before and leftovers(tmp_path) == []   # old split kept, build removed


def test_unexpected_entries_summarises_big_folders(tmp_path):
    for i in range(7):
        (tmp_path / ".git" / "objects").mkdir(parents=True, exist_ok=True)
        (tmp_path / ".git" / "objects" / str(i)).write_text("x")
    (tmp_path / "train" / "A" / "own").mkdir(parents=True)
    (tmp_path / "train" / "A" / "ours.jpg").write_text("x")
    (tmp_path / "train" / "link").symlink_to(tmp_path / ".git")
    found = makedata.unexpected_entries(tmp_path, {"train/A/ours.jpg"})
    assert found == [".git/ (7 entries)", "train/A/own/", "train/link"]


def test_interrupted_builds_are_cleared_and_an_old_split_named(tmp_path):
    src = _tiny_source(tmp_path, {"a": 3, "b": 3})
    dst = tmp_path / "data"
    build = tmp_path / ".data.tmp-ab12cd34"            # a killed run's unfinished split
    (build / "train" / "a").mkdir(parents=True)
    aside = tmp_path / ".data.old-0a1b2c3d"            # a killed run's old split, moved aside
    (aside / "train" / "a").mkdir(parents=True)
    (aside / "split.json").write_text("{}")
    mine = tmp_path / ".data.tmp-notes.txt"            # a user's file, not a folder of ours
    mine.write_text("keep me")
    proc = run_script("makedata.py", "--src", src, "--dst", dst, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert not build.exists() and f"removed {build}" in proc.stderr
    assert aside.exists() and str(aside) in proc.stderr and "warning" in proc.stderr
    assert mine.read_text() == "keep me"
    assert (dst / "split.json").is_file()
