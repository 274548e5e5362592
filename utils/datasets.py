"""Train/val image folders for train.py and image lists for test.py.

Layout read by train.py (what makedata.py writes)::

    <data>/train/<class name>/<image>
    <data>/val/<class name>/<image>

Listing uses ``utils.images.scan_image_folder`` (any extension in
``IMAGE_EXTENSIONS``, nested folders inside a class allowed, hidden files ignored)
and decoding uses ``utils.images.open_rgb``.

Checks made before any training starts (a ``DatasetError`` with a message):
a missing data/train/val folder, a split without class folders, a class folder
without images, and train and val class lists that differ.

Unreadable images (policy): every image is checked when the folders are scanned
(``check="full"`` decodes each file, ``"header"`` only opens it, ``"none"`` skips the
check). Files that fail are *skipped with a warning* -- listed with the reason, and
train.py writes them to ``skipped_images.txt`` -- because one bad file in thousands
should not stop a run. If skipping leaves a class empty, that is an error. A file that
passed the scan but fails to decode later (``header``/``none`` mode, or changed on
disk) is skipped too: ``ImageDataset`` warns once, gives the next readable image of
the split in its place, and records the file in a :class:`SkippedImages` that the
main process reads after each epoch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

# DatasetError lives in utils.images (no torch there, for predict_onnx.py); re-exported here
from utils.images import DatasetError, ImageReadError, atomic_write_text, open_rgb, scan_image_folder  # noqa: F401

CHECK_MODES = ("full", "header", "none")


@dataclass
class Split:
    """One split (train or val) after scanning and checking."""

    name: str
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def counts(self) -> list[int]:
        out = [0] * len(self.classes)
        for _, label in self.samples:
            out[label] += 1
        return out


def _check_one(path: Path, mode: str) -> Optional[str]:
    """None when the file is readable, else the reason."""
    try:
        if mode == "full":
            open_rgb(path)
        else:
            with Image.open(path) as img:
                img.size  # noqa: B018 - opening parses the header
    except ImageReadError as exc:
        return str(exc)
    except Exception as exc:  # PIL raises many types for garbage files
        return f"cannot read image {path}: {exc or type(exc).__name__}"
    return None


def find_unreadable(paths: Sequence[Path], mode: str = "full",
                    threads: int = 4) -> dict[Path, str]:
    """Map of unreadable files to the reason (decoding releases the GIL: threads help)."""
    if mode not in CHECK_MODES:
        raise ValueError(f"image check must be one of {CHECK_MODES}, not {mode!r}")
    if mode == "none" or not paths:
        return {}
    with ThreadPoolExecutor(max(1, threads)) as pool:
        reasons = list(pool.map(lambda p: _check_one(p, mode), paths))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def scan_split(root: Path, name: str, check: str = "full", threads: int = 4) -> Split:
    """List one split, drop unreadable files, and refuse empty classes."""
    if not root.exists():
        raise DatasetError(
            f"{name} folder not found: {root} (expected <data>/{name}/<class>/<images>; "
            "make it with makedata.py)")
    if not root.is_dir():
        raise DatasetError(f"{name} path is not a folder: {root}")
    index = scan_image_folder(root)
    if not index.classes:
        raise DatasetError(f"no class folders in {root} (expected {root}/<class>/<images>)")
    skipped = [(str(p), reason) for p, reason in index.skipped]
    all_files = [p for c in index.classes for p in index.images[c]]
    bad = find_unreadable(all_files, check, threads)
    skipped += [(str(p), reason) for p, reason in bad.items()]
    samples = [(str(p), idx) for idx, c in enumerate(index.classes)
               for p in index.images[c] if p not in bad]
    split = Split(name=name, root=root, classes=list(index.classes), samples=samples,
                  skipped=skipped)
    empty = [c for c, n in zip(split.classes, split.counts()) if n == 0]
    if empty:
        raise DatasetError(
            f"{len(empty)} class folder(s) in {root} have no readable images: "
            + ", ".join(repr(c) for c in empty)
            + " (add images or remove the folder from both train and val)")
    return split


def load_train_val(data: str | os.PathLike, check: str = "full",
                   threads: int = 4) -> tuple[Split, Split]:
    """Scan <data>/train and <data>/val and check that they agree."""
    data = Path(data)
    if not data.is_dir():
        raise DatasetError(f"data folder not found: {data} (make it with makedata.py, "
                           "or pass --data)")
    for name in ("train", "val"):  # both folders first: one message for a missing split
        if not (data / name).is_dir():
            raise DatasetError(f"{name} folder not found: {data / name} (expected "
                               f"{data}/train/<class>/... and {data}/val/<class>/...; "
                               "make them with makedata.py)")
    train = scan_split(data / "train", "train", check, threads)
    val = scan_split(data / "val", "val", check, threads)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DatasetError(
            "train and val have different class folders"
            + (f"; only in train: {only_train}" if only_train else "")
            + (f"; only in val: {only_val}" if only_val else "")
            + " (both splits need the same classes: re-run makedata.py)")
    return train, val


def _remove_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked DataLoader worker must not delete the main process's file
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class SkippedImages:
    """The files a run leaves out: those the scan skipped (``scanned``) and images that
    fail to decode while loading. Loading may happen in DataLoader worker processes, so
    those append to a file that the main process reads (:meth:`update`); the file is
    removed when this object is."""

    def __init__(self, scanned: Sequence[tuple[str, str]] = ()):
        self.found: dict[str, str] = dict(scanned)  # path -> reason
        self.reported = 0  # how many of found the run has reported so far
        fd, self.log_path = tempfile.mkstemp(prefix="unreadable-images-", suffix=".tsv")
        os.close(fd)
        weakref.finalize(self, _remove_if_owner, self.log_path, os.getpid())

    def note(self, path: str, reason: str) -> None:
        """Record an image that failed to decode (in any process): warn once, append."""
        self._read_log()  # another worker, or an earlier pass over the split, may have found it
        if path in self.found:
            return
        self.found[path] = reason
        logging.getLogger(__name__).warning("warning: %s; skipping it (the next readable image of the "
                                            "split takes its place)", reason)
        line = f"{path}\t{' '.join(reason.split())}\n"
        try:
            with open(self.log_path, "a", encoding="utf-8") as fh:  # one short append: not interleaved
                fh.write(line)
        except OSError as exc:  # the warning above still names the file
            logging.getLogger(__name__).warning("warning: cannot record it in %s: %s", self.log_path, exc)

    def _read_log(self) -> None:
        try:
            with open(self.log_path, encoding="utf-8") as fh:
                lines = fh.readlines()
        except OSError:  # removed or unreadable: what this process found is still in self.found
            return
        for line in lines:
            path, _, reason = line.rstrip("\n").partition("\t")
            self.found.setdefault(path, reason)

    def update(self) -> list[tuple[str, str]]:
        """Read what worker processes recorded; return the entries not reported before."""
        self._read_log()
        new = list(self.found.items())[self.reported:]
        self.reported = len(self.found)
        return new

    def report(self, list_file: Path, log: logging.Logger) -> None:
        """Log the files left out since the last call and write all of them to ``list_file``."""
        new = self.update()
        if new:
            log.warning("skipped %d file(s) that cannot be used (listed in %s), e.g. %s", len(new),
                        list_file.name, new[0][1])
            atomic_write_text(list_file, "".join(f"{p}\t{r}\n" for p, r in self.found.items()))


class ImageDataset(Dataset):
    """``(image tensor, label)`` for a list of ``(path, label)``; decodes with open_rgb.

    With ``skipped``, an image that cannot be decoded is recorded there and the next
    readable sample of the list (and its label) is returned instead, the same one
    whichever process loads it; without, ``ImageReadError`` is raised."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable,
                 skipped: Optional[SkippedImages] = None):
        self.samples = list(samples)
        self.transform = transform
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if self.skipped is None:
            path, label = self.samples[i]
            return self.transform(open_rgb(path)), label
        for offset in range(len(self.samples)):
            path, label = self.samples[(i + offset) % len(self.samples)]
            if path in self.skipped.found:
                continue
            try:
                return self.transform(open_rgb(path)), label
            except ImageReadError as exc:
                self.skipped.note(path, str(exc))
        raise DatasetError(f"none of the {len(self.samples)} images of this split can be read "
                           "(listed in skipped_images.txt); check the data folder")


# ----------------------------------------------------------------------- test.py inputs

class PredictDataset(Dataset):
    """``(tensor, index, error)`` per file; an unreadable file gives a zero tensor and
    the reason, so one bad file does not stop a prediction run."""

    def __init__(self, files: Sequence[Path], transform: Callable, img_size: int):
        self.files = [str(f) for f in files]
        self.transform = transform
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.transform(open_rgb(self.files[i])), i, ""
        except ImageReadError as exc:
            return torch.zeros(3, self.img_size, self.img_size), i, str(exc)
