"""Known failures end every script in one line and a non-zero exit, and leave files intact.

What a user meets on a CPU machine: unreadable images found while training, a scan
backend that needs a GPU, memory running out, a full disk or a read-only folder, an
--output that is a folder, report files of another run beside the CSV. Disk cases run
on a small tmpfs where this test may mount one (root, mount allowed), and again with
the error raised in-process, so they are covered where mounting is refused.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import mean_std
import utils.images
from test_train_test import TINY, _make_source, exits, output, read_csv, run, small_split
from utils.errors import LogFile, failure_message

CPU_ALLOCATION_FAILURE = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                          "you tried to allocate 25769803776 bytes. Error code 12 (Cannot allocate memory)")


def exit_status(main, argv, capsys) -> tuple[int, str]:
    """``main(argv)``'s exit status (a message given to SystemExit exits with 1) and output."""
    code, text = exits(main, argv, capsys)
    return (1 if isinstance(code, str) else code), text


def one_line(text: str) -> str:
    """The error line of a failed run's output; no traceback around it."""
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def temporary_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]


# ----------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return small_split(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def trained(split, train_script, tmp_path_factory) -> Path:
    """A finished one-epoch run folder (test_vit, no EMA)."""
    out = tmp_path_factory.mktemp("faults-run") / "run"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "1", "--ema-decay", "0",
                                        *TINY)])
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(name, size, read_only=False) -> Path``: a tmpfs of its own under tmp_path
    (skips the test where mounting is not allowed); unmounted afterwards."""
    mounted = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True) if shutil.which("mount") else None
        if proc is None or proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() if proc else 'no mount command'})")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount_read_only(point: Path) -> None:
    assert os.path.ismount(point), point  # only ever the test's own tmpfs
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True, capture_output=True)


def fill(point: Path, leave: int = 0) -> None:
    """Fill the file system of ``point`` up to ``leave`` free bytes."""
    stat = os.statvfs(point)
    free = stat.f_bavail * stat.f_frsize
    with open(point / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * max(0, free - leave))
            fh.flush()
        except OSError:
            pass


# ----------------------------------------------------------------------- unreadable images found while training

def truncated_jpeg(good: Path, target: Path) -> None:
    from PIL import Image
    full = target.with_suffix(".full.jpg")
    Image.open(good).convert("RGB").save(full, quality=90)
    data = full.read_bytes()
    full.unlink()
    target.write_bytes(data[: len(data) // 3])


@pytest.mark.slow
@pytest.mark.parametrize("check,workers", [("header", 2), ("none", 0)])
def test_unreadable_images_are_skipped_whatever_the_check(train_script, tmp_path, split, check, workers):
    data = tmp_path / "data"
    shutil.copytree(split, data)
    train_class, val_class = sorted((data / "train").iterdir())[0], sorted((data / "val").iterdir())[1]
    truncated_jpeg(next(train_class.iterdir()), train_class / "truncated.jpg")
    truncated_jpeg(next(val_class.iterdir()), val_class / "truncated_val.jpg")
    out = tmp_path / "run"
    train_script.main([str(a) for a in ("--data", data, "--output", out, "--epochs", "1", "--ema-decay", "0",
                                        *TINY, "--workers", workers, "--check-images", check)])
    listed = (out / "skipped_images.txt").read_text()
    assert "truncated.jpg" in listed and "truncated_val.jpg" in listed and len(listed.splitlines()) == 2
    assert "skipped 2 file(s)" in (out / "train.log").read_text()
    assert len(read_csv(out / "metrics.csv")) == 1 and (out / "report.txt").is_file()


def test_an_unreadable_image_gives_the_next_readable_one(tmp_path, split):
    from utils.datasets import DatasetError, ImageDataset, SkippedImages
    images = sorted((split / "train").rglob("*.*"))[:3]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    samples = [(str(images[0]), 0), (str(bad), 1), (str(images[1]), 2)]
    skipped = SkippedImages()
    dataset = ImageDataset(samples, lambda img: img.size, skipped)
    assert dataset[1] == dataset[2] and dataset[1][1] == 2  # the next sample, with its label
    assert list(skipped.found) == [str(bad)] and skipped.update() == [(str(bad), skipped.found[str(bad)])]
    assert skipped.update() == []  # reported once
    with pytest.raises(DatasetError, match="none of the 1 images"):
        ImageDataset([(str(bad), 0)], lambda img: img, SkippedImages())[0]


# ----------------------------------------------------------------------- scan backend without a GPU

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_train_says_at_start_up_that_a_gpu_scan_needs_a_gpu(tmp_path, split):
    proc = run("train.py", "--data", split, "--output", tmp_path / "out", *TINY, "--model", "groupmamba_tiny",
               "--scan-backend", "triton")
    assert proc.returncode == 1, output(proc)
    line = one_line(output(proc))
    assert "scan backend 'triton' needs a CUDA GPU, and this machine has no CUDA GPU" in line
    assert "pip install" not in line and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "grid"])
def test_predict_says_before_predicting_that_a_gpu_scan_needs_a_gpu(test_script, capsys, tmp_path, split, backend):
    ckpt = tmp_path / "groupmamba.pth"  # the check comes before the weights are read
    torch.save({"model": {}, "model_name": "groupmamba_tiny", "model_kwargs": {"num_classes": 3},
                "class_names": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.2] * 3, "img_size": 32}, ckpt)
    code, text = exit_status(test_script.main, ["--checkpoint", ckpt, "--images", split / "val", "--output",
                                          tmp_path / "p.csv", "--scan-backend", backend, "--device", "cpu"], capsys)
    assert code == 2
    assert f"scan backend '{backend}' needs a CUDA GPU" in one_line(text)
    assert not (tmp_path / "p.csv").exists()


def test_scan_backend_causes_in_order(monkeypatch):
    from kernels import grid_scan
    from kernels.selective_scan import BackendUnavailableError
    import utils.accel as accel
    cuda = torch.device("cuda")  # never touched: the checks only read its type
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(BackendUnavailableError, match=r"needs a CUDA GPU, and the run is on cpu \(--device\)"):
        accel.resolve_scan_backend("cuda", torch.device("cpu"))
    monkeypatch.setattr(grid_scan, "HAS_TRITON", False)
    for backend in ("triton", "grid"):
        with pytest.raises(BackendUnavailableError, match="needs Triton, which is not installed"):
            accel.resolve_scan_backend(backend, cuda)
    monkeypatch.setattr(accel, "available_backends", lambda: {"cuda": "ImportError: no groupmamba_scan_cuda"})
    with pytest.raises(BackendUnavailableError, match="extension, which is not built.*pip install"):
        accel.resolve_scan_backend("cuda", cuda)
    assert accel.resolve_scan_backend("torch", cuda) == "torch"


# ----------------------------------------------------------------------- out of memory

def raise_cpu_out_of_memory(*args, **kwargs):
    raise RuntimeError(CPU_ALLOCATION_FAILURE)


def test_train_out_of_cpu_memory_names_the_batch_size(train_script, monkeypatch, capsys, tmp_path, split):
    monkeypatch.setattr(train_script, "train_one_epoch", raise_cpu_out_of_memory)
    code, text = exit_status(train_script.main, ["--data", split, "--output", tmp_path / "run", "--epochs", "1", *TINY,
                                           "--model", "groupmamba_tiny", "--scan-backend", "torch"], capsys)
    line = one_line(text)
    assert code == 1 and "out of CPU memory" in line
    assert "--batch-size 8" in line and "32 px" in line and "--low-memory" in line
    assert not (tmp_path / "run" / "last.pth").exists()


def test_train_out_of_gpu_memory(train_script, monkeypatch, capsys, tmp_path, split):
    def raise_gpu_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_script, "train_one_epoch", raise_gpu_out_of_memory)
    code, text = exit_status(train_script.main, ["--data", split, "--output", tmp_path / "run", "--epochs", "1", *TINY],
                       capsys)
    line = one_line(text)
    assert code == 1 and "out of GPU memory" in line and "--batch-size 8" in line
    assert "--low-memory" not in line  # test_vit is not a GroupMamba model


def test_predict_out_of_memory_names_the_batch_size(test_script, monkeypatch, capsys, tmp_path, trained, split):
    monkeypatch.setattr(test_script, "prediction_rows", raise_cpu_out_of_memory)
    code, text = exit_status(test_script.main, ["--checkpoint", trained / "best.pth", "--images", split / "val",
                                          "--output", tmp_path / "p.csv", "--batch-size", "4", "--workers", "0",
                                          "--device", "cpu"], capsys)
    line = one_line(text)
    assert code == 2 and "out of CPU memory" in line and "--batch-size 4" in line
    assert not (tmp_path / "p.csv").exists()


def test_an_error_from_a_worker_is_shown_without_the_worker_traceback():
    from utils.datasets import DatasetError
    wrapped = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1\nutils.datasets.DatasetError: none of the 3 images")
    assert failure_message(wrapped, (DatasetError,)) == "none of the 3 images"
    assert failure_message(ValueError("a bug")) is None and failure_message(KeyError("x")) is None


# ----------------------------------------------------------------------- full disk, read-only folder: train.py

def resume_argv(run_folder: Path) -> list[str]:
    return ["--resume", str(run_folder / "last.pth"), "--epochs", "2"]


def check_checkpoint_failure(text: str, run_folder: Path, before: dict, what: str) -> None:
    line = one_line(text)
    assert what in line and "unchanged" in line, line
    assert str(run_folder / "last.pth") in line or str(run_folder / "best.pth") in line, line
    after = snapshot(run_folder)
    for name in ("last.pth", "best.pth", "report.txt"):
        assert after[name] == before[name], name
    assert temporary_files(run_folder) == []


def test_train_disk_full_while_saving_a_checkpoint(train_script, monkeypatch, capsys, tmp_path, trained):
    """torch.save on a full disk: an OSError inside a RuntimeError about file positions."""
    run_folder = tmp_path / "run"
    shutil.copytree(trained, run_folder)
    before = snapshot(run_folder)

    def save_on_full_disk(obj, fh):
        fh.write(b"\0" * 4096)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1143552 vs 1143448")

    monkeypatch.setattr(torch, "save", save_on_full_disk)
    code, text = exit_status(train_script.main, resume_argv(run_folder), capsys)
    assert code == 1
    check_checkpoint_failure(text, run_folder, before, "no space left on the device")


@pytest.mark.slow
def test_train_disk_full_on_a_tmpfs(tmpfs, tmp_path, trained):
    disk = tmpfs("disk", "24m")
    run_folder = disk / "run"
    shutil.copytree(trained, run_folder)
    before = snapshot(run_folder)
    fill(disk, leave=256 * 1024)  # room for the logs and metrics, not for a checkpoint
    proc = run("train.py", *resume_argv(run_folder))
    assert proc.returncode == 1, output(proc)
    check_checkpoint_failure(proc.stderr, run_folder, before, "no space left on the device")


def test_train_read_only_run_folder(train_script, capsys, tmpfs, tmp_path, trained):
    disk = tmpfs("ro", "24m")
    run_folder = disk / "run"
    shutil.copytree(trained, run_folder)
    before = snapshot(run_folder)
    remount_read_only(disk)
    code, text = exit_status(train_script.main, resume_argv(run_folder), capsys)
    assert code == 1
    line = one_line(text)
    assert "the file system is read-only" in line and str(run_folder) in line
    assert snapshot(run_folder) == before


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES, errno.EISDIR])
def test_checkpoint_write_errors_name_the_path_and_keep_the_old_file(tmp_path, monkeypatch, error):
    from utils.checkpoint import save_checkpoint
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def refuse(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(OSError) as info:
        save_checkpoint({"epoch": 2}, path)
    assert info.value.errno == error and info.value.filename == str(path)
    assert str(path) in failure_message(info.value)
    assert path.read_bytes() == before and temporary_files(tmp_path) == []


def test_a_log_file_on_a_full_disk_warns_once(tmp_path, capsys):
    import logging
    logger = logging.getLogger("faults-log-file")
    handler = LogFile(tmp_path / "train.log")
    logger.addHandler(handler)

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    handler.stream = FullDisk()
    try:
        for _ in range(3):
            logger.warning("a message")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("no space left on the device") == 1, err


# ----------------------------------------------------------------------- full disk, read-only folder: mean_std.py

def mean_std_fails(source: Path, out: Path, capsys) -> str:
    code, text = exit_status(mean_std.main, ["--root", source, "--out", out, "--no-progress", "--workers", "0"], capsys)
    assert code == 1
    return one_line(text)


def test_mean_std_read_only_folder_is_said_before_reading_images(monkeypatch, capsys, tmp_path, split):
    real_mkstemp = utils.images.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path / "ro":
            raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / ".stats.json.x.tmp"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(utils.images.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(mean_std, "compute_stats", lambda *a, **k: pytest.fail("read the images first"))
    line = mean_std_fails(split / "train", tmp_path / "ro" / "stats.json", capsys)
    assert f"mean_std.py: error: {tmp_path / 'ro' / 'stats.json'}: the file system is read-only" in line


def test_mean_std_read_only_tmpfs(tmpfs, capsys, split):
    disk = tmpfs("ro", "1m")
    remount_read_only(disk)
    assert "the file system is read-only" in mean_std_fails(split / "train", disk / "stats.json", capsys)


def test_mean_std_disk_full_keeps_the_old_file(monkeypatch, capsys, tmp_path, split):
    out = tmp_path / "stats.json"
    out.write_text(json.dumps({"mean": [0.1] * 3, "std": [0.2] * 3, "num_pixels": 1}))
    before = out.read_bytes()
    monkeypatch.setattr(os, "fsync", full_disk)
    line = mean_std_fails(split / "train", out, capsys)
    assert f"{out}: no space left on the device" in line
    assert out.read_bytes() == before and temporary_files(tmp_path) == []


def test_mean_std_names_a_killed_write_s_temporary_file(capsys, tmp_path, split):
    leftover = tmp_path / ".stats.json.ab12cd34.tmp"  # what a write stopped by kill -9 leaves
    leftover.write_text("partial")
    mean_std.main(["--root", str(split / "train"), "--out", str(tmp_path / "stats.json"), "--no-progress",
                   "--workers", "0"])
    err = capsys.readouterr().err
    assert f"warning: {leftover} is a temporary file an interrupted write" in err
    assert leftover.read_text() == "partial" and (tmp_path / "stats.json").is_file()


def test_mean_std_disk_full_tmpfs(tmpfs, capsys, split):
    disk = tmpfs("full", "1m")
    fill(disk)
    assert "no space left on the device" in mean_std_fails(split / "train", disk / "stats.json", capsys)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


# ----------------------------------------------------------------------- test.py: output checks, disk

def predict(test_script, capsys, trained, images, out, *extra):
    return exit_status(test_script.main, ["--checkpoint", trained / "best.pth", "--images", images, "--output", out,
                                    "--workers", "0", "--device", "cpu", *extra], capsys)


def test_predict_output_folder_is_refused_before_predicting(test_script, monkeypatch, capsys, tmp_path, trained,
                                                            split):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    monkeypatch.setattr(test_script, "prediction_rows", lambda *a, **k: pytest.fail("predicted first"))
    code, text = predict(test_script, capsys, trained, split / "val", folder, "--force")
    assert code == 2 and f"--output {folder} is a folder" in one_line(text)
    assert snapshot(folder) == {"mine.txt": b"keep"}


def test_predict_unlabelled_ignores_report_files_it_would_not_write(test_script, capsys, tmp_path, trained, split):
    images = tmp_path / "new"
    images.mkdir()
    for i, f in enumerate(sorted((split / "val").rglob("*.*"))[:3]):
        shutil.copy(f, images / f"{i}{f.suffix}")
    for name in ("p_report.txt", "p_report.json", "p_confusion_matrix.png"):
        (tmp_path / name).write_text("a labelled run's report")
    code, text = predict(test_script, capsys, trained, images, tmp_path / "p.csv")
    assert code == 0, text
    assert len(read_csv(tmp_path / "p.csv")) == 3
    assert (tmp_path / "p_report.txt").read_text() == "a labelled run's report"
    # a labelled folder writes them: then they are protected
    (tmp_path / "p.csv").unlink()
    code, text = predict(test_script, capsys, trained, split / "val", tmp_path / "p.csv")
    assert code == 2 and "p_report.txt" in one_line(text) and "--force" in text
    assert not (tmp_path / "p.csv").exists()


def test_predict_read_only_folder_is_said_before_predicting(test_script, monkeypatch, capsys, tmpfs, trained,
                                                            split):
    disk = tmpfs("ro", "1m")
    remount_read_only(disk)
    monkeypatch.setattr(test_script, "prediction_rows", lambda *a, **k: pytest.fail("predicted first"))
    code, text = predict(test_script, capsys, trained, split / "val", disk / "p.csv")
    assert code == 2 and f"{disk / 'p.csv'}: the file system is read-only" in one_line(text)


def test_predict_permission_denied(test_script, monkeypatch, capsys, tmp_path, trained, split):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".p.csv.x.tmp"))

    monkeypatch.setattr(utils.images.tempfile, "mkstemp", denied)
    code, text = predict(test_script, capsys, trained, split / "val", tmp_path / "p.csv")
    assert code == 2 and f"{tmp_path / 'p.csv'}: permission denied" in one_line(text)


def full_disk(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_predict_disk_full(test_script, monkeypatch, capsys, tmp_path, trained, split):
    monkeypatch.setattr(os, "fsync", full_disk)
    code, text = predict(test_script, capsys, trained, split / "val", tmp_path / "p.csv")
    assert code == 2 and f"{tmp_path / 'p.csv'}: no space left on the device" in one_line(text)
    assert not (tmp_path / "p.csv").exists() and temporary_files(tmp_path) == []


def test_predict_disk_full_tmpfs(test_script, capsys, tmpfs, trained, split):
    disk = tmpfs("full", "1m")
    fill(disk)
    code, text = predict(test_script, capsys, trained, split / "val", disk / "p.csv")
    assert code == 2 and "no space left on the device" in one_line(text)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


# ----------------------------------------------------------------------- makedata.py

def makedata_fails(source: Path, dst: Path, capsys) -> str:
    import makedata
    code, text = exit_status(makedata.main, ["--src", source, "--dst", dst, "--no-progress"], capsys)
    assert code == 1
    return one_line(text)


def test_makedata_disk_full_names_the_destination(monkeypatch, capsys, tmp_path):
    import makedata
    source = _make_source(tmp_path / "images", classes=2, per_class=3)

    def copy_on_full_disk(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(makedata.shutil, "copy2", copy_on_full_disk)
    line = makedata_fails(source, tmp_path / "data", capsys)
    assert f"makedata.py: error: {tmp_path / 'data'}: no space left on the device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no half-built split left


def test_makedata_disk_full_tmpfs(tmpfs, capsys, tmp_path):
    source = _make_source(tmp_path / "images", classes=2, per_class=3)
    disk = tmpfs("full", "1m")
    fill(disk, leave=8 * 1024)
    assert f"{disk / 'data'}: no space left on the device" in makedata_fails(source, disk / "data", capsys)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_known_error_keeps_its_message_over_the_disk_problem_behind_it():
    from utils.datasets import DatasetError
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/data/train")
        except OSError as exc:
            raise DatasetError("cannot list /data/train: permission denied") from exc
    except DatasetError as exc:
        assert failure_message(exc, (DatasetError,)) == "cannot list /data/train: permission denied"
    disk_full = OSError(errno.ENOSPC, "No space left on device", "/data/x.jpg")
    assert failure_message(disk_full, (OSError,)).startswith("/data/x.jpg: no space left on the device")
