"""Image-folder helpers shared by the scripts (mean_std.py ... test.py, predict_onnx.py).

Needs only numpy and Pillow (no torch), so predict_onnx.py can use it.

A data set is a folder with one sub-folder per class (the torchvision ImageFolder
layout)::

    root/<class name>/<image>          (nested folders inside a class are allowed)

The public API is small:

``IMAGE_EXTENSIONS``
    Lower-case file extensions (with the dot) treated as images. Matching is
    case-insensitive; use ``is_image_file`` rather than testing the set yourself.
``scan_image_folder(root) -> ImageFolderIndex``
    Lists classes and their image files, sorted and deterministic. Hidden files and
    folders (name starting with ".") are skipped; non-image files inside class
    folders and images lying directly under ``root`` are reported in ``skipped``.
    Class indices follow the sorted class names, as in torchvision's ImageFolder.
``collect_images(spec) -> (files, folder)`` / ``labels_from_folder(files, folder, names)``
    The images test.py and predict_onnx.py predict: one file, a folder (recursive)
    or a glob pattern; and their labels when the folder is laid out by class.
``open_rgb(path) -> PIL.Image.Image`` / ``to_rgb(image)``
    Decodes any image (modes L, P, RGBA, LA, CMYK, I;16, I, F, ...) to an 8-bit RGB
    image; raises ``ImageReadError`` with the path and the reason when it cannot.
``atomic_write_text(path, text)`` / ``atomic_write_json(path, obj)``
    Write to a temporary file in the same folder, then ``os.replace`` it into
    place: readers see the old file or the new one, never a half-written one.
``update_json(path, updates)``
    Merge ``updates`` into the JSON object in ``path`` (created when absent), atomically.

The helpers never print; callers decide how to report ``skipped`` files and read
errors.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from utils.errors import reraise_with_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageFolderIndex",
    "ImageReadError",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_replace", "check_writable",
    "collect_images",
    "update_json",
    "is_image_file",
    "labels_from_folder",
    "open_rgb",
    "scan_image_folder",
    "to_rgb",
]

#: Extensions (lower case, with the dot) of the files treated as images.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
})

#: Colour used under transparent pixels by ``open_rgb`` unless told otherwise.
DEFAULT_BACKGROUND = (255, 255, 255)


class DatasetError(ValueError):
    """A data folder or image list that cannot be used; the message says why and what to do."""


class ImageReadError(OSError):
    """An image file that cannot be opened or decoded (the message names it)."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


# --------------------------------------------------------------------------- listing

@dataclass
class ImageFolderIndex:
    """What ``scan_image_folder`` found under ``root``.

    Attributes:
        root: the folder that was scanned.
        classes: class names (sub-folder names), sorted.
        images: class name -> its image files (``root / class / ...`` paths),
            sorted by their path relative to the class folder.
        skipped: ``(path, reason)`` for files that were left out: non-image files
            inside class folders and image files directly under ``root``. Other
            non-image files directly under ``root`` (a README, say) are ignored
            silently.
    """

    root: Path
    classes: list[str] = field(default_factory=list)
    images: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(len(files) for files in self.images.values())

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def samples(self) -> list[tuple[Path, int]]:
        """``(path, class index)`` for every image, class by class, in order."""
        return [(path, idx) for idx, name in enumerate(self.classes)
                for path in self.images[name]]


def _walk_files(folder: Path) -> Iterator[Path]:
    """Non-hidden files under ``folder``, recursively, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if not _is_hidden(name):
                yield Path(dirpath, name)


def scan_image_folder(root: str | os.PathLike) -> ImageFolderIndex:
    """List the class folders under ``root`` and the image files in each.

    Deterministic: classes sorted by name, files sorted by their path relative to
    the class folder (nested folders are walked). A class folder without images
    is kept (with an empty list) so the caller can say so.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")

    index = ImageFolderIndex(root=root)
    with os.scandir(root) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        path = root / entry.name
        if entry.is_dir():
            index.classes.append(entry.name)
        elif is_image_file(entry.name):
            index.skipped.append((path, "image outside any class folder"))

    for name in index.classes:
        class_dir = root / name
        files = []
        for path in _walk_files(class_dir):
            if is_image_file(path.name):
                files.append(path)
            else:
                index.skipped.append((path, "not an image file (extension)"))
        files.sort(key=lambda p: p.relative_to(class_dir).as_posix())
        index.images[name] = files
    return index


def collect_images(spec: str) -> tuple[list[Path], Optional[Path]]:
    """Images named by ``spec``: one image file, a folder (searched recursively), or a
    glob pattern (``**`` allowed). Returns the sorted files and the folder when ``spec``
    was a folder (else None). Hidden files are ignored in folders."""
    path = Path(spec)
    if path.is_file():
        if not is_image_file(path):
            raise DatasetError(f"not an image file (extension): {path}")
        return [path], None
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath, f) for f in filenames
                      if not f.startswith(".") and is_image_file(f)]
        if not files:
            raise DatasetError(f"no image files under {path}")
        return sorted(files), path
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                       if os.path.isfile(p) and is_image_file(p))
        if not files:
            raise DatasetError(f"no image files match {spec!r}")
        return files, None
    raise DatasetError(f"--images not found: {spec} (give an image, a folder or a glob)")


def labels_from_folder(files: Sequence[Path], folder: Optional[Path],
                       class_names: Sequence[str]) -> Optional[list[int]]:
    """Class indices when ``folder`` is laid out as ``folder/<class name>/...`` with the
    checkpoint's class names for every image; None when it is not labelled that way."""
    if folder is None:
        return None
    index = {name: i for i, name in enumerate(class_names)}
    labels = []
    for f in files:
        parts = f.relative_to(folder).parts
        if len(parts) < 2 or parts[0] not in index:
            return None
        labels.append(index[parts[0]])
    return labels


# --------------------------------------------------------------------------- decoding

def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey image -> 8-bit 'L', scaling, not clipping.

    Integer modes (I;16*, I) are taken as 16-bit data (0..65535 -> 0..255). Float
    images ('F') are taken as 0..1 when their maximum is at most 1, else 0..255.
    """
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        arr = np.nan_to_num(arr, nan=0.0) * scale
    else:
        arr = np.clip(arr, 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """A decoded image of any mode as 8-bit RGB, as :func:`open_rgb` converts it."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(img).convert("RGB")
    has_alpha = (mode in ("RGBA", "LA", "PA", "RGBa", "La")
                 or "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(path: str | os.PathLike,
             background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Open and fully decode an image file as an 8-bit RGB ``PIL.Image``.

    - Any mode is accepted: grey and palette images are expanded, CMYK is
      converted, 16-bit and float images are rescaled to 0..255 (not clipped).
    - Transparent pixels (RGBA, LA, PA, palette or grey transparency) are
      composited over ``background`` (white by default), so hidden colour values
      under transparent pixels never leak into the result.
    - The EXIF orientation tag is applied, so photos come out the right way up.
    - Multi-frame files (GIF, TIFF) give their first frame.

    The file is closed before returning. Truncated, corrupt or unsupported files
    raise ``ImageReadError`` naming the path and the reason.
    """
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img, background)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, TypeError,
            Image.DecompressionBombError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ImageReadError(f"cannot read image {os.fspath(path)}: {reason}") from exc


# --------------------------------------------------------------------------- writing

@contextmanager
def atomic_replace(path: str | os.PathLike, public: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder to write; on success it is flushed to
    disk and renamed over ``path`` with ``os.replace``, so ``path`` is never half written.

    On any failure the temporary file is removed, an existing ``path`` stays as it was,
    and a full disk or a read-only folder raises an ``OSError`` naming ``path``.
    ``public``: the usual permissions (0o666 minus umask) instead of mkstemp's 0o600.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # a read-only or full folder: name the file that was asked for
        reraise_with_path(exc, path)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:  # what the writer closed is on disk before the rename
            os.fsync(fh.fileno())
        if public:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        reraise_with_path(exc, path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_replace`); returns ``Path(path)``.
    An existing ``path`` is replaced: deciding whether that is allowed is the caller's job."""
    with atomic_replace(path) as tmp:
        with open(tmp, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
    return Path(path)


def check_writable(path: str | os.PathLike) -> list[Path]:
    """Raise now the ``OSError`` (naming ``path``) that writing ``path`` would meet in a
    read-only or locked folder, before long work: creates and removes a temporary file.
    Returns the temporary files of ``path`` that an interrupted write left there, for the
    caller to name (another process may be writing it right now)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else Path("."),
                                   prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        reraise_with_path(exc, path)
    os.close(fd)
    os.unlink(tmp)
    return leftover_temp_files(path.parent if str(path.parent) else Path("."), [path.name])


def temp_file_pattern(names: Iterable[str]) -> re.Pattern:
    """The temporary names the atomic writers give ``names``: ``.<name>.<8 random>.tmp``
    (tempfile.mkstemp in save_checkpoint and atomic_write_text) and ``.<name>.tmp.png``
    (the plots)."""
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"\.({alternatives})\.([a-z0-9_]{{8}}\.tmp|tmp\.png)")


def leftover_temp_files(folder: Path, names: Iterable[str]) -> list[Path]:
    """Regular files in ``folder`` named like an atomic writer's temporary file for one of
    ``names``: what a write stopped hard left behind (the caller holds the folder's lock,
    so no write is under way)."""
    pattern = temp_file_pattern(names)
    return sorted(p for p in Path(folder).iterdir()
                  if pattern.fullmatch(p.name) and stat.S_ISREG(p.lstat().st_mode))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """``atomic_write_text`` of ``obj`` as UTF-8 JSON (non-ASCII kept readable)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def update_json(path: str | os.PathLike, updates: dict) -> Path:
    """Merge ``updates`` over the JSON object already in ``path`` (if any) and write the
    result atomically; other keys are kept (records that several scripts add to)."""
    path = Path(path)
    previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if not isinstance(previous, dict):
        raise ValueError(f"{path} does not hold a JSON object; not merging into it")
    return atomic_write_json(path, {**previous, **updates})
