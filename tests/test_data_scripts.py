"""Tests of utils/images.py, mean_std.py and makedata.py (CPU, a few seconds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import makedata
import mean_std
from utils.images import (IMAGE_EXTENSIONS, ImageReadError, atomic_write_json,
                          atomic_write_text, is_image_file, open_rgb, scan_image_folder)

REPO = Path(__file__).resolve().parents[1]
DATA1 = REPO / "data1"
DATA1_COUNTS = {
    "Black-grass": 223, "Charlock": 331, "Cleavers": 243, "Common Chickweed": 518,
    "Common wheat": 187, "Fat Hen": 403, "Loose Silky-bent": 555, "Maize": 187,
    "Scentless Mayweed": 438, "Shepherds Purse": 195,
    "Small-flowered Cranesbill": 421, "Sugar beet": 326,
}
REAL_CLASSES = ("Black-grass", "Common wheat", "Maize")
REAL_PER_CLASS = 4


# --------------------------------------------------------------------------- fixtures

def _rng_image(rng, h, w, channels):
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _build_dataset(root: Path) -> dict:
    """Small data set: real JPEGs from data1 plus synthetic images in odd modes,
    a corrupt file, a truncated JPEG, a .txt, hidden files. Returns the expected
    RGB arrays of every readable image, keyed by path."""
    rng = np.random.default_rng(0)
    expected = {}
    for name in REAL_CLASSES:
        (root / name).mkdir(parents=True)
        for src in sorted((DATA1 / name).iterdir())[:REAL_PER_CLASS]:
            dst = root / name / src.name
            shutil.copy2(src, dst)
            with Image.open(dst) as im:
                expected[dst] = np.asarray(im.convert("RGB"))
    grass, wheat, maize = (root / n for n in REAL_CLASSES)

    grey = _rng_image(rng, 31, 17, 1)                       # mode L, PNG
    Image.fromarray(grey, mode="L").save(grass / "grey.png")
    expected[grass / "grey.png"] = np.repeat(grey[..., None], 3, axis=2)

    rgba = _rng_image(rng, 20, 33, 4)                      # RGBA, alpha 0 or 255
    rgba[..., 3] = np.where(rgba[..., 3] > 127, 255, 0)
    Image.fromarray(rgba, mode="RGBA").save(grass / "alpha.png")
    composite = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
    expected[grass / "alpha.png"] = composite

    palette_rgb = _rng_image(rng, 16, 1, 3).reshape(16, 3)  # mode P, GIF
    idx = rng.integers(0, 16, size=(25, 19), dtype=np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette(palette_rgb.flatten().tolist() + [0] * (768 - 48))
    pal.save(wheat / "palette.gif")
    expected[wheat / "palette.gif"] = palette_rgb[idx]

    rgb = _rng_image(rng, 12, 40, 3)                       # RGB PNG, upper-case ext
    Image.fromarray(rgb).save(maize / "SHOUTING.PNG", format="PNG")
    expected[maize / "SHOUTING.PNG"] = rgb

    (maize / "broken.jpg").write_bytes(b"this is not a JPEG at all")
    real_jpeg = next(p for p in sorted(maize.iterdir()) if p.suffix == ".jpg"
                     and p.name != "broken.jpg")
    (wheat / "truncated.jpg").write_bytes(real_jpeg.read_bytes()[:400])
    (wheat / "notes.txt").write_text("not an image\n")
    (grass / ".DS_Store").write_bytes(b"\0\1\2")
    (root / "README.md").write_text("a data set\n")        # root-level, ignored
    return expected


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "images"
    expected = _build_dataset(root)
    return root, expected


def run_script(*args, cwd=REPO):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def snapshot(folder: Path) -> dict:
    """Relative path -> bytes (or link target) of everything under ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir"
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- utils/images.py

def test_image_extensions_case_insensitive():
    for ext in ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm"):
        assert f".{ext}" in IMAGE_EXTENSIONS
        assert is_image_file(f"a/b.{ext.upper()}")
    assert not is_image_file("notes.txt") and not is_image_file("jpg")


def test_scan_image_folder(dataset):
    root, expected = dataset
    index = scan_image_folder(root)
    assert index.classes == sorted(REAL_CLASSES)
    found = {p for files in index.images.values() for p in files}
    # every image-named file is listed (readable or not); nothing hidden
    assert found == set(expected) | {root / "Maize" / "broken.jpg",
                                     root / "Common wheat" / "truncated.jpg"}
    for files in index.images.values():
        assert files == sorted(files, key=lambda p: p.name)
    assert [p.name for p, _ in index.skipped] == ["notes.txt"]
    assert index.num_images == len(found)
    assert index.samples()[0][1] == 0 and index.samples()[-1][1] == len(REAL_CLASSES) - 1
    assert index.class_to_idx == {n: i for i, n in enumerate(sorted(REAL_CLASSES))}


def test_scan_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        scan_image_folder(tmp_path / "file.jpg")
    index = scan_image_folder(tmp_path)           # an image outside any class
    assert index.classes == [] and index.skipped[0][0].name == "file.jpg"


def test_open_rgb_modes(dataset, tmp_path):
    root, expected = dataset
    for path, want in expected.items():
        img = open_rgb(path)
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), want, err_msg=str(path))

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (5, 4), (0, 0, 0, 0)).save(cmyk)
    assert open_rgb(cmyk).getpixel((0, 0)) == (255, 255, 255)

    deep = tmp_path / "deep.png"                  # 16-bit grey: scaled, not clipped
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(deep)
    assert Image.open(deep).mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(open_rgb(deep))[0, :, 0], [0, 128, 255])

    la = tmp_path / "la.png"                      # transparent grey -> background
    Image.new("LA", (2, 2), (10, 0)).save(la)
    assert open_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(la, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("name", ["Maize/broken.jpg", "Common wheat/truncated.jpg"])
def test_open_rgb_unreadable(dataset, name):
    root, _ = dataset
    with pytest.raises(ImageReadError, match="cannot read image") as info:
        open_rgb(root / name)
    assert os.fspath(root / name) in str(info.value)
    assert isinstance(info.value, OSError)


def test_atomic_write(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": [1, 2], "名": "é"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": [1, 2], "名": "é"}
    atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0o600

    def fail(*_):
        raise OSError("disk on fire")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(target, "third\n")
    assert target.read_text() == "second\n"       # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]   # no temp file


# --------------------------------------------------------------------------- mean_std.py

def _numpy_stats(arrays):
    pixels = np.concatenate([a.reshape(-1, 3) for a in arrays]).astype(np.float64) / 255
    return pixels.mean(axis=0), pixels.std(axis=0), pixels.shape[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_mean_std_matches_numpy(dataset, tmp_path, capsys, workers):
    root, expected = dataset
    out = tmp_path / "stats.json"
    assert mean_std.main(["--root", str(root), "--out", str(out), "--no-progress",
                          "--workers", str(workers)]) == 0
    result = json.loads(out.read_text())
    mean, std, num_pixels = _numpy_stats(list(expected.values()))
    np.testing.assert_allclose(result["mean"], mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result["std"], std, rtol=1e-12, atol=0)
    assert result["num_images"] == len(expected)
    assert result["num_pixels"] == num_pixels
    assert result["root"] == str(root)
    skipped = {Path(s["path"]).name for s in result["skipped"]}
    assert skipped == {"broken.jpg", "truncated.jpg", "notes.txt"}
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "truncated.jpg" in err and "notes.txt" in err


def test_mean_std_independent_of_workers(dataset):
    root, _ = dataset
    paths = [p for files in scan_image_folder(root).images.values() for p in files]
    one = mean_std.compute_stats(paths, workers=0)
    two = mean_std.compute_stats(list(reversed(paths)), workers=2)
    assert one == two                             # exact integer accumulation
    assert [Path(u["path"]).name for u in one["unreadable"]] == ["truncated.jpg",
                                                                 "broken.jpg"]


def test_mean_std_empty_folder_fails(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_script("mean_std.py", "--root", empty, "--out", tmp_path / "s.json")
    assert res.returncode != 0
    assert "no class folders" in res.stderr
    (empty / "cats").mkdir()
    (empty / "cats" / "readme.txt").write_text("x")
    res = run_script("mean_std.py", "--root", empty, "--out", tmp_path / "s.json")
    assert res.returncode != 0 and "no image files" in res.stderr
    (empty / "cats" / "bad.png").write_bytes(b"nope")
    res = run_script("mean_std.py", "--root", empty, "--out", tmp_path / "s.json")
    assert res.returncode != 0 and "could be read" in res.stderr
    res = run_script("mean_std.py", "--root", tmp_path / "missing", "--out",
                     tmp_path / "s.json")
    assert res.returncode != 0 and "not found" in res.stderr
    assert not (tmp_path / "s.json").exists()
    assert "Traceback" not in res.stderr


def test_mean_std_out_file_policy(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "mine.json"
    out.write_text("my notes, not statistics\n")
    args = ["--root", str(root), "--out", str(out), "--no-progress", "--workers", "0"]
    with pytest.raises(SystemExit, match="--force"):
        mean_std.main(args)
    assert out.read_text() == "my notes, not statistics\n"
    assert mean_std.main(args + ["--force"]) == 0
    first = json.loads(out.read_text())
    out.write_text(json.dumps({**first, "mean": [0, 0, 0]}))
    assert mean_std.main(args) == 0               # our own stats file: overwritten
    assert json.loads(out.read_text()) == first


@pytest.mark.slow
def test_mean_std_data1_published_figures():
    paths = [p for files in scan_image_folder(DATA1).images.values() for p in files]
    stats = mean_std.compute_stats(paths, workers=mean_std.default_workers())
    assert stats["num_images"] == 4027 and not stats["unreadable"]
    assert [round(v, 3) for v in stats["mean"]] == [0.493, 0.430, 0.301]
    assert [round(v, 3) for v in stats["std"]] == [0.160, 0.158, 0.167]


# --------------------------------------------------------------------------- makedata.py

def _split(src, dst, *extra):
    return makedata.main(["--src", str(src), "--dst", str(dst), "--no-progress",
                          *map(str, extra)])


def _readable_by_class(root, expected):
    out = {}
    for path in expected:
        out.setdefault(path.parent.name, set()).add(path.name)
    return out


def test_makedata_stratified(dataset, tmp_path, capsys):
    root, expected = dataset
    dst = tmp_path / "data"
    assert _split(root, dst) == 0
    record = json.loads((dst / "split.json").read_text())
    assert record["seed"] == 42 and record["val_fraction"] == 0.3
    assert record["src"] == str(root) and record["link"] == "copy"
    valid = _readable_by_class(root, expected)
    assert record["classes"] == sorted(valid)
    for name, files in valid.items():
        train, val = set(record["train"][name]), set(record["val"][name])
        assert train | val == files and not train & val
        n_val = min(max(round(len(files) * 0.3), 1), len(files) - 1)
        assert len(val) == n_val
        assert record["counts"][name] == {"total": len(files), "train": len(train),
                                          "val": n_val}
        for split, names in (("train", train), ("val", val)):
            on_disk = {p.name for p in (dst / split / name).iterdir()}
            assert on_disk == names
    out = capsys.readouterr()
    assert "class" in out.out and "total" in out.out
    for name in valid:
        assert name in out.out
    assert leftovers(tmp_path) == []


def test_split_class_rules():
    train, val = makedata.split_class(["b", "a"], 0.3, 0, "c")
    assert len(train) == len(val) == 1 and sorted(train + val) == ["a", "b"]
    train, val = makedata.split_class(list("abc"), 0.01, 0, "c")
    assert len(val) == 1 and len(train) == 2      # at least one in val
    train, val = makedata.split_class(list("abc"), 0.99, 0, "c")
    assert len(val) == 2 and len(train) == 1      # at least one in train
    files = [f"{i:03d}.jpg" for i in range(100)]
    train, val = makedata.split_class(files, 0.3, 5, "c")
    assert len(val) == 30 and sorted(train + val) == files
    # the input order does not matter, the seed and class name do
    assert makedata.split_class(files[::-1], 0.3, 5, "c") == (train, val)
    assert makedata.split_class(files, 0.3, 6, "c") != (train, val)
    assert makedata.split_class(files, 0.3, 5, "d") != (train, val)


def test_makedata_deterministic(dataset, tmp_path):
    root, _ = dataset
    lists = {}
    for run, seed in (("a", 42), ("b", 42), ("c", 7)):
        assert _split(root, tmp_path / run, "--seed", seed) == 0
        record = json.loads((tmp_path / run / "split.json").read_text())
        lists[run] = (record["train"], record["val"])
    assert lists["a"] == lists["b"]
    assert lists["a"] != lists["c"]
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_makedata_existing_dst(dataset, tmp_path):
    root, _ = dataset
    dst = tmp_path / "data"
    assert _split(root, dst) == 0
    before = snapshot(dst)
    res = run_script("makedata.py", "--src", root, "--dst", dst, "--seed", "1",
                     "--no-progress")
    assert res.returncode != 0
    assert "already exists" in res.stderr and "--force" in res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(dst) == before

    res = run_script("makedata.py", "--src", root, "--dst", dst, "--seed", "1",
                     "--force", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads((dst / "split.json").read_text())["seed"] == 1
    assert snapshot(dst) != before
    assert leftovers(tmp_path) == []


def test_makedata_force_refuses_foreign_folder(dataset, tmp_path):
    root, _ = dataset
    dst = tmp_path / "thesis"
    dst.mkdir()
    (dst / "chapter1.tex").write_text("precious")
    with pytest.raises(SystemExit, match="does not look like"):
        _split(root, dst, "--force")
    assert (dst / "chapter1.tex").read_text() == "precious"
    with pytest.raises(SystemExit, match="is or contains --src"):
        _split(root, root.parent, "--force")
    with pytest.raises(SystemExit, match="inside --src"):
        _split(root, root / "split")
    assert sorted(os.listdir(root.parent)) == ["images"]


def test_makedata_empty_dst_folder_is_used(dataset, tmp_path):
    root, _ = dataset
    (tmp_path / "data").mkdir()
    assert _split(root, tmp_path / "data") == 0
    assert (tmp_path / "data" / "split.json").is_file()


@pytest.mark.parametrize("link", ["symlink", "hardlink", "copy"])
def test_makedata_link_modes(dataset, tmp_path, link):
    root, _ = dataset
    dst = tmp_path / "data"
    assert _split(root, dst, "--link", link) == 0
    record = json.loads((dst / "split.json").read_text())
    assert record["link"] == link
    for split in ("train", "val"):
        for name, files in record[split].items():
            for rel in files:
                made, source = dst / split / name / rel, root / name / rel
                assert made.read_bytes() == source.read_bytes()
                assert made.is_symlink() == (link == "symlink")
                if link == "symlink":
                    assert not os.path.isabs(os.readlink(made))
                    assert made.resolve() == source.resolve()
                assert os.path.samefile(made, source) == (link != "copy")
    if link == "symlink":                         # relative links survive a move
        moved = tmp_path / "moved"
        dst.rename(moved)
        assert all(p.exists() for p in moved.rglob("*.jpg"))


def test_makedata_hardlink_across_devices(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    real_stat = os.stat

    def fake_stat(path, *a, **k):
        st = real_stat(path, *a, **k)
        if Path(path) == tmp_path:
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1) + tuple(st)[3:])
        return st
    monkeypatch.setattr(os, "stat", fake_stat)
    with pytest.raises(SystemExit, match="different file systems"):
        _split(root, tmp_path / "data", "--link", "hardlink")
    assert not (tmp_path / "data").exists()


def _tiny_source(base: Path, counts: dict) -> Path:
    src = base / "src"
    jpeg = next((DATA1 / "Maize").iterdir()).read_bytes()
    for name, n in counts.items():
        (src / name).mkdir(parents=True)
        for i in range(n):
            (src / name / f"{i}.jpg").write_bytes(jpeg)
    return src


def test_makedata_class_too_small(tmp_path):
    src = _tiny_source(tmp_path, {"big": 3, "lonely": 1, "none": 0})
    (src / "none" / "broken.png").write_bytes(b"corrupt")
    with pytest.raises(SystemExit) as info:
        _split(src, tmp_path / "data")
    message = str(info.value)
    assert "'lonely' has 1 valid image" in message and "'none' has 0" in message
    assert "at least 2" in message and "'big'" not in message
    assert not (tmp_path / "data").exists() and leftovers(tmp_path) == []
    res = run_script("makedata.py", "--src", src, "--dst", tmp_path / "data")
    assert res.returncode != 0 and "at least 2" in res.stderr


def test_makedata_reports_non_images(dataset, tmp_path, capsys):
    root, _ = dataset
    dst = tmp_path / "data"
    assert _split(root, dst) == 0
    err = capsys.readouterr().err
    for name in ("notes.txt", "broken.jpg", "truncated.jpg"):
        assert name in err
        assert not list(dst.rglob(name))
    record = json.loads((dst / "split.json").read_text())
    assert {Path(s["path"]).name for s in record["skipped"]} == {
        "notes.txt", "broken.jpg", "truncated.jpg"}
    assert not list(dst.rglob(".DS_Store"))


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.2", "nan", "abc"])
def test_makedata_bad_fraction(tmp_path, fraction):
    with pytest.raises(SystemExit) as info:
        makedata.main(["--src", str(tmp_path), "--dst", str(tmp_path / "d"),
                       "--val-fraction", fraction])
    assert info.value.code == 2                  # argparse usage error


def test_makedata_bad_src(tmp_path):
    res = run_script("makedata.py", "--src", tmp_path / "missing", "--dst",
                     tmp_path / "data")
    assert res.returncode != 0 and "does not exist" in res.stderr
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    res = run_script("makedata.py", "--src", tmp_path / "flat", "--dst",
                     tmp_path / "data")
    assert res.returncode != 0 and "no class folders" in res.stderr
    assert not (tmp_path / "data").exists()


def test_makedata_interrupted_build_leaves_no_half_split(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    dst = tmp_path / "data"
    assert _split(root, dst) == 0
    before = snapshot(dst)
    calls = {"n": 0}
    real_place = makedata._place_file

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_place(*args)
    monkeypatch.setattr(makedata, "_place_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        _split(root, dst, "--force", "--seed", "3")
    assert snapshot(dst) == before                # old split untouched
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        _split(root, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()      # no half-built new split
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- data1

def test_data1_has_12_classes_and_4027_images():
    assert DATA1.is_dir(), f"{DATA1} is missing"
    index = scan_image_folder(DATA1)
    assert index.classes == sorted(DATA1_COUNTS)
    assert {n: len(f) for n, f in index.images.items()} == DATA1_COUNTS
    assert index.num_images == 4027
    assert index.skipped == []
    assert (DATA1 / "README.md").is_file()
