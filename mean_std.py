#!/usr/bin/env python3
"""Per-channel mean and standard deviation of an image-folder data set.

The figures are computed over ALL pixels of ALL images (every image converted to
8-bit RGB, values scaled to [0, 1]): the pixel-level mean and the population
standard deviation that ``transforms.Normalize(mean, std)`` expects. Sums and sums
of squares are accumulated as exact integers, so the result does not depend on
the number of workers or the order of the images.

    python3 mean_std.py                       # data1/ -> stats.json
    python3 mean_std.py --root data/train     # statistics of the training split only

Unreadable images and non-image files are listed and left out. The result is
printed and written (atomically) as JSON:
``{"mean": [r, g, b], "std": [r, g, b], "num_images": n, "num_pixels": p, "root": ...}``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.errors import exit_if_known
from utils.images import ImageReadError, atomic_write_json, check_writable, open_rgb, scan_image_folder

PROG = "mean_std.py"
MAX_LISTED = 20          # skipped files printed before "... and N more"
_LEVELS = np.arange(256, dtype=np.int64)
_LEVELS_SQUARED = _LEVELS * _LEVELS


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--root", default="data1",
                      help="data set folder: one sub-folder per class")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="stats.json",
                     help="JSON file to write the statistics to. An existing file "
                          "written by this script is overwritten; any other "
                          "existing file is left alone unless --force is given")
    out.add_argument("--force", action="store_true",
                     help="overwrite --out even if it is not a statistics file "
                          "written by this script")
    out.add_argument("--no-progress", action="store_true",
                     help="do not show the progress bar")
    run = parser.add_argument_group("performance")
    run.add_argument("--workers", type=_non_negative_int, default=default_workers(),
                     help="processes decoding images (0: decode in this process)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- computing

def image_sums(path: str | os.PathLike):
    """Integer per-channel sums of one image (RGB, 0..255).

    Returns ``(path, (sum, sum_of_squares, num_pixels), None)`` or, when the file
    cannot be read, ``(path, None, error message)``.
    """
    try:
        pixels = np.asarray(open_rgb(path), dtype=np.uint8).reshape(-1, 3)
    except ImageReadError as exc:
        return os.fspath(path), None, str(exc)
    # a 256-bin histogram per channel gives exact integer sums, and is faster
    # than widening every pixel to int64
    hists = [np.bincount(pixels[:, c], minlength=256) for c in range(3)]
    sums = [int(h @ _LEVELS) for h in hists]
    squares = [int(h @ _LEVELS_SQUARED) for h in hists]
    return os.fspath(path), (sums, squares, pixels.shape[0]), None


def _map(paths: list, workers: int):
    """Yield ``image_sums`` results, in parallel when ``workers`` > 1."""
    if workers <= 1 or len(paths) < 2:
        for path in paths:
            yield image_sums(path)
        return
    chunksize = max(1, min(64, len(paths) // (workers * 8)))
    with Pool(processes=min(workers, len(paths))) as pool:
        yield from pool.imap_unordered(image_sums, paths, chunksize=chunksize)


def finish_stats(sums: list[int], squares: list[int], num_pixels: int):
    """Exact mean and population std in [0, 1] units from integer 0..255 sums."""
    mean, std = [], []
    for s, q in zip(sums, squares):
        mean.append(s / (255 * num_pixels))
        # var = (N*Q - S^2) / (N^2 * 255^2), numerator exact in Python integers
        var = (num_pixels * q - s * s) / (num_pixels * num_pixels * 255 * 255)
        std.append(math.sqrt(max(var, 0.0)))
    return mean, std


def compute_stats(paths: list, workers: int = 0, progress: bool = False) -> dict:
    """Mean/std over all pixels of the images in ``paths``.

    Returns ``{"mean", "std", "num_images", "num_pixels", "unreadable"}`` where
    ``unreadable`` lists ``{"path", "reason"}`` for files that could not be read
    (sorted by path). ``mean``/``std`` are ``None`` when no image could be read.
    """
    sums, squares, num_pixels, num_images = [0, 0, 0], [0, 0, 0], 0, 0
    unreadable = []
    bar = tqdm(total=len(paths), unit="img", desc="mean/std", disable=not progress,
               file=sys.stderr)
    with bar:
        for path, result, error in _map(list(paths), workers):
            bar.update(1)
            if result is None:
                unreadable.append({"path": path, "reason": error})
                continue
            s, q, n = result
            sums = [a + b for a, b in zip(sums, s)]
            squares = [a + b for a, b in zip(squares, q)]
            num_pixels += n
            num_images += 1
    unreadable.sort(key=lambda item: item["path"])
    mean = std = None
    if num_pixels:
        mean, std = finish_stats(sums, squares, num_pixels)
    return {"mean": mean, "std": std, "num_images": num_images,
            "num_pixels": num_pixels, "unreadable": unreadable}


# --------------------------------------------------------------------------- I/O

def is_stats_file(path: Path) -> bool:
    """True when ``path`` holds a statistics JSON this script could have written."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"mean", "std", "num_pixels"} <= data.keys()


def check_out_path(out: Path, force: bool) -> None:
    """Refuse (SystemExit) to write where it could destroy a user's file."""
    if out.is_dir():
        raise SystemExit(f"{PROG}: error: --out {out} is a folder; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise SystemExit(f"{PROG}: error: folder of --out does not exist: {parent}")
    if out.exists() and not force and not is_stats_file(out):
        raise SystemExit(f"{PROG}: error: {out} exists and is not a statistics file "
                         f"written by {PROG}; choose another --out or pass --force "
                         f"to overwrite it")
    # a read-only folder is said now, not after reading every image
    for leftover in check_writable(out):
        print(f"{PROG}: warning: {leftover} is a temporary file an interrupted write of {out} left "
              "behind; delete it unless another mean_std.py is writing that file now", file=sys.stderr)


def report_skipped(title: str, items: list[dict]) -> None:
    if not items:
        return
    print(f"{PROG}: skipped {len(items)} {title}:", file=sys.stderr)
    for item in items[:MAX_LISTED]:
        print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
    if len(items) > MAX_LISTED:
        print(f"  ... and {len(items) - MAX_LISTED} more (listed in the output JSON)",
              file=sys.stderr)


def print_result(result: dict) -> None:
    mean = [round(v, 6) for v in result["mean"]]
    std = [round(v, 6) for v in result["std"]]
    print(f"images: {result['num_images']}  pixels: {result['num_pixels']}  "
          f"root: {result['root']}")
    print(f"mean (R, G, B): {', '.join(f'{v:.4f}' for v in mean)}")
    print(f"std  (R, G, B): {', '.join(f'{v:.4f}' for v in std)}")
    print((mean, std))          # the tutorial's print form: ([mean], [std])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Exception as exc:
        exit_if_known(exc, prefix=f"{PROG}: error: ", memory_hint="use fewer --workers")
        raise


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out_path(out, args.force)
    try:
        index = scan_image_folder(args.root)
    except OSError as exc:
        raise SystemExit(f"{PROG}: error: {exc}") from None
    if not index.classes:
        raise SystemExit(f"{PROG}: error: no class folders under {args.root} "
                         f"(expected {args.root}/<class>/<image>)")
    paths = [p for name in index.classes for p in index.images[name]]
    non_images = [{"path": os.fspath(p), "reason": r} for p, r in index.skipped]
    report_skipped("files that are not images", non_images)
    if not paths:
        raise SystemExit(f"{PROG}: error: no image files found under {args.root}")

    stats = compute_stats(paths, workers=args.workers, progress=not args.no_progress)
    report_skipped("unreadable images", stats["unreadable"])
    if not stats["num_images"]:
        raise SystemExit(f"{PROG}: error: none of the {len(paths)} image files under "
                         f"{args.root} could be read")

    result = {"mean": stats["mean"], "std": stats["std"],
              "num_images": stats["num_images"], "num_pixels": stats["num_pixels"],
              "root": os.fspath(args.root), "num_classes": len(index.classes),
              "definition": "RGB, values in [0, 1], over all pixels of all images; "
                            "population std",
              "skipped": non_images + stats["unreadable"]}
    atomic_write_json(out, result)
    print_result(result)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
