#!/usr/bin/env python3
"""Split an image-folder data set into train/ and val/, stratified and reproducible.

    python3 makedata.py                          # data1/<class>/* -> data/{train,val}/<class>/*
    python3 makedata.py --val-fraction 0.2 --seed 7 --link symlink --force

For every class the valid images (sorted by path) are shuffled with a
``random.Random`` seeded from ``--seed`` and the class name, and
``round(n * val_fraction)`` of them (at least 1, at most n - 1) go to val/, the rest
to train/. A class's split therefore depends only on its own files, the seed and
the fraction. Every image is decoded once first: non-image files and unreadable
images are reported and left out.

Safety: an existing non-empty --dst is never touched without --force, and even
then only when it is a split this script made and nothing else: its split.json must
carry ``"made_by": "makedata.py"`` with the current ``"format"``, and every entry
in --dst (hidden ones and folders included) must be split.json, a file it lists
under ``"files"`` or a folder holding such files. Anything else (a .git folder, a
.env file, your own files in train/ or val/, a split.json that is missing,
unreadable or from an older version) makes it refuse and name what would be lost;
listed files that are gone since are no loss and do not stop it. The new split is
built in a hidden temporary folder next to --dst and renamed into place; with
--force the old split is moved aside and deleted only after the new one is in
place. An interrupted run leaves --dst as it was. ``<dst>/split.json`` records the
source, seed, fraction, every file of each part and, under ``"files"``, the path
of every file written, relative to --dst (links included).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import random
import shutil
import sys
import tempfile
import uuid
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from utils.errors import exit_if_known, reraise_with_path
from utils.images import ImageReadError, atomic_write_json, open_rgb, scan_image_folder

PROG = "makedata.py"
SPLITS = ("train", "val")
SPLIT_FILE = "split.json"
SPLIT_FORMAT = 2                # split.json with "made_by" and "files"
LINK_MODES = ("copy", "hardlink", "symlink")
MAX_LISTED = 20


class SplitError(ValueError):
    """A data set or destination that cannot be split as asked (message says why)."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(
            f"must be strictly between 0 and 1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("folders")
    io.add_argument("--src", default="data1",
                    help="source data set: one sub-folder per class")
    io.add_argument("--dst", default="data",
                    help="output folder; gets train/<class>, val/<class> and split.json")
    io.add_argument("--force", action="store_true",
                    help="replace an existing --dst, only if it holds nothing but a "
                         "split this script made (its split.json and the files that "
                         "lists); any other entry, hidden ones included, makes it refuse. "
                         "The old split is removed after the new one is in place")
    io.add_argument("--link", choices=LINK_MODES, default="copy",
                    help="how files get into --dst: copied, hard-linked (same file "
                         "system only) or symlinked (relative links to --src)")
    split = parser.add_argument_group("split")
    split.add_argument("--val-fraction", type=_fraction, default=0.3,
                       help="share of each class that goes to val/ (0 < f < 1)")
    split.add_argument("--seed", type=int, default=42,
                       help="seed of the per-class shuffles")
    out = parser.add_argument_group("output")
    out.add_argument("--no-progress", action="store_true",
                     help="do not show progress bars")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- planning

def split_class(files: list[str], val_fraction: float, seed: int,
                class_name: str) -> tuple[list[str], list[str]]:
    """Split one class's files into (train, val), both sorted.

    ``round(n * val_fraction)`` files, clamped to [1, n - 1], go to val. Raises
    ``SplitError`` when the class has fewer than 2 files.
    """
    if len(files) < 2:
        raise SplitError(f"class {class_name!r} has {len(files)} valid image(s); "
                         f"every class needs at least 2 (one for train, one for val)")
    order = sorted(files)
    # not sklearn's train_test_split(stratify=...): it shuffles all classes together, so one class's files would move another's
    random.Random(f"{seed}/{class_name}").shuffle(order)
    n_val = min(max(round(len(order) * val_fraction), 1), len(order) - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def plan_split(files: dict[str, list[str]], val_fraction: float,
               seed: int) -> dict[str, dict[str, list[str]]]:
    """``{"train": {class: [files]}, "val": {class: [files]}}`` for every class.

    ``files`` maps class name -> file paths relative to the class folder. All
    classes too small to split are reported in one ``SplitError``.
    """
    plan = {name: {} for name in SPLITS}
    too_small = []
    for name in sorted(files):
        try:
            plan["train"][name], plan["val"][name] = split_class(
                files[name], val_fraction, seed, name)
        except SplitError as exc:
            too_small.append(str(exc))
    if too_small:
        raise SplitError("cannot split: " + "; ".join(too_small))
    return plan


def collect_valid_images(src: Path, progress: bool = False):
    """Scan ``src`` and decode every image once.

    Returns ``(classes, files, skipped)``: the class names, class -> readable
    images as POSIX paths relative to the class folder, and ``{"path", "reason"}``
    for every file left out. Raises ``SplitError`` if ``src`` has no class folders.
    """
    try:
        index = scan_image_folder(src)
    except OSError as exc:
        raise SplitError(str(exc)) from None
    if not index.classes:
        raise SplitError(f"no class folders under {src} (expected {src}/<class>/<image>)")
    skipped = [{"path": os.fspath(p), "reason": r} for p, r in index.skipped]
    files = {}
    total = index.num_images
    with tqdm(total=total, unit="img", desc="checking images", disable=not progress,
              file=sys.stderr) as bar:
        for name in index.classes:
            class_dir = src / name
            files[name] = []
            for path in index.images[name]:
                bar.update(1)
                try:
                    open_rgb(path)
                except ImageReadError as exc:
                    skipped.append({"path": os.fspath(path), "reason": str(exc)})
                    continue
                files[name].append(path.relative_to(class_dir).as_posix())
    return index.classes, files, skipped


# --------------------------------------------------------------------------- destination

def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def recorded_files(dst: Path) -> tuple[set[str] | None, str]:
    """``(paths, "")``: what ``dst/split.json`` says this script wrote there (itself
    included, relative to ``dst``), or ``(None, why not)`` when it is not such a record."""
    path = dst / SPLIT_FILE
    if path.is_symlink() or not path.is_file():
        return None, f"no {SPLIT_FILE} file"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, f"{SPLIT_FILE} is not readable JSON"
    if not isinstance(record, dict) or record.get("made_by") != PROG:
        return None, (f"{SPLIT_FILE} has no \"made_by\": \"{PROG}\" marker, so an older "
                      f"{PROG} or another tool wrote it")
    files = record.get("files")
    if (record.get("format") != SPLIT_FORMAT or not isinstance(files, list)
            or not all(isinstance(f, str) for f in files)):
        return None, f"{SPLIT_FILE} is not format {SPLIT_FORMAT} with a file list"
    return {*files, SPLIT_FILE}, ""


def _raise(exc: OSError) -> None:
    raise exc


def walk_entries(folder: Path) -> tuple[set[str], set[str]]:
    """``(folders, others)``: relative POSIX paths of every entry under ``folder``,
    hidden ones included. Links are listed, never followed."""
    folders, others = set(), set()
    # an unreadable sub-folder must stop the check, not hide what is in it
    for root, dirnames, filenames in os.walk(folder, onerror=_raise):
        base = Path(root).relative_to(folder)
        for name in dirnames + filenames:
            is_folder = (Path(root) / name).is_dir() and not (Path(root) / name).is_symlink()
            (folders if is_folder else others).add((base / name).as_posix())
    return folders, others


def unexpected_entries(folder: Path, ours: set[str]) -> list[str]:
    """What deleting ``folder`` would lose beyond ``ours`` (files written there):
    one item per top-most foreign entry, shown as its only file or empty folder
    (folders end in "/"), or as ``"<folder>/ (<n> entries)"``."""
    our_folders = {p.as_posix() for rel in ours for p in PurePosixPath(rel).parents}
    folders, others = walk_entries(folder)
    foreign_folders = folders - our_folders
    not_empty = {p.rsplit("/", 1)[0] for p in folders | others if "/" in p}
    leaves = sorted(others - ours) + sorted(f + "/" for f in foreign_folders - not_empty)
    groups: dict[str, list[str]] = {}
    for leaf in sorted(leaves):
        parts = leaf.rstrip("/").split("/")
        tops = ("/".join(parts[:i]) for i in range(1, len(parts)))
        top = next((t + "/" for t in tops if t in foreign_folders), leaf)
        groups.setdefault(top, []).append(leaf)
    return [found[0] if len(found) == 1 else f"{top} ({len(found)} entries)"
            for top, found in groups.items()]


def _listing(items: list[str], shown: int = 5) -> str:
    rest = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + rest


def check_replaceable(dst: Path) -> None:
    """Raise ``SplitError`` unless everything in ``dst`` is a split this script
    made: its split.json and files that lists (a listed file gone since is no loss)."""
    ours, why_not = recorded_files(dst)
    foreign = unexpected_entries(dst, ours or set())
    if ours is None:
        raise SplitError(f"--dst {dst} does not look like a split made by this version "
                         f"of {PROG} ({why_not}), so --force will not delete it; it "
                         f"holds {_listing(foreign)}; if all of that is yours to lose, "
                         f"delete {dst} yourself, otherwise move it away or choose "
                         f"another --dst")
    if foreign:
        raise SplitError(f"--force would delete what {PROG} did not write in --dst {dst}: "
                         f"{_listing(foreign)}; move those out of {dst} or choose "
                         f"another --dst")


def check_destination(src: Path, dst: Path, force: bool, link: str) -> None:
    """Raise ``SplitError`` unless building ``dst`` is safe and allowed."""
    src_real, dst_real = src.resolve(), dst.resolve()
    if _is_within(src_real, dst_real):
        raise SplitError(f"--dst {dst} is or contains --src {src}; choose another --dst")
    if _is_within(dst_real, src_real):
        raise SplitError(f"--dst {dst} is inside --src {src}; it would become a class "
                         f"folder there; choose a folder outside --src")
    parent = dst_real.parent
    if not parent.is_dir():
        raise SplitError(f"folder of --dst does not exist: {parent}")
    if link == "hardlink" and os.stat(src_real).st_dev != os.stat(parent).st_dev:
        raise SplitError(f"--link hardlink: {src} and {dst} are on different file "
                         f"systems and hard links cannot cross them; use --link copy "
                         f"or --link symlink")
    if not (dst.exists() or dst.is_symlink()):
        return
    if dst.is_symlink() or not dst.is_dir():
        raise SplitError(f"--dst {dst} exists and is not a folder; refusing to replace "
                         f"it, choose another --dst")
    if not os.listdir(dst):
        return                                   # an empty folder holds nothing to lose
    if not force:
        raise SplitError(f"--dst {dst} already exists; pass --force to replace it "
                         f"(or choose another --dst)")
    check_replaceable(dst)


def written_paths(plan: dict) -> list[str]:
    """Every file ``build_split`` writes for ``plan``, relative to --dst."""
    return sorted(f"{split}/{name}/{rel}" for split, classes in plan.items()
                  for name, files in classes.items() for rel in files)


def _place_file(source: Path, target: Path, link: str, final_target: Path) -> None:
    if link == "copy":
        shutil.copy2(source, target)
    elif link == "hardlink":
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise SplitError(f"cannot hard-link {source} into {target.parent}: "
                                 f"different file systems; use --link copy or "
                                 f"--link symlink") from None
            raise SplitError(f"cannot hard-link {source}: {exc}; use --link copy") from None
    else:
        # relative to where the link will live once the build folder is renamed
        relative = os.path.relpath(source.resolve(), final_target.parent)
        try:
            os.symlink(relative, target)
        except OSError as exc:
            raise SplitError(f"cannot create symlink {target}: {exc}; "
                             f"use --link copy") from None


def build_split(src: Path, build: Path, final: Path, plan: dict, link: str,
                progress: bool = False) -> None:
    """Create ``build/<split>/<class>/<file>`` from ``src/<class>/<file>``.

    ``final`` is where ``build`` will be renamed to (relative symlinks point from
    there).
    """
    total = sum(len(f) for part in plan.values() for f in part.values())
    with tqdm(total=total, unit="file", desc=f"{link}ing", disable=not progress,
              file=sys.stderr) as bar:
        for split, classes in plan.items():
            for name, files in classes.items():
                for rel in files:
                    target = build / split / name / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _place_file(src / name / rel, target, link,
                                final / split / name / rel)
                    bar.update(1)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def swap_into_place(build: Path, dst: Path) -> None:
    """Rename ``build`` to ``dst``; an existing ``dst`` is moved aside first and
    deleted only once the new one is in place (restored if the rename fails)."""
    os.chmod(build, 0o777 & ~_umask())           # mkdtemp made it private
    if not dst.exists():
        os.rename(build, dst)
        return
    if not os.listdir(dst):
        os.rmdir(dst)
        os.rename(build, dst)
        return
    check_replaceable(dst)                       # again: it may have changed meanwhile
    aside = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dst, aside)
    try:
        os.rename(build, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as exc:
        print(f"{PROG}: warning: new split is in place but the old one could not be "
              f"removed: {aside} ({exc})", file=sys.stderr)


def clear_interrupted_builds(dst: Path) -> None:
    """Remove the temporary build folders a killed run left next to ``dst``
    (``.<name>.tmp-<random>``: never a complete split in place) and name an old split it
    had moved aside (``.<name>.old-<random>``), which may be the only copy: that one stays."""
    dst_abs = dst.resolve()
    if not dst_abs.parent.is_dir():
        return
    for entry in sorted(dst_abs.parent.glob(f".{dst_abs.name}.*-*")):
        kind = entry.name[len(dst_abs.name) + 2:].split("-", 1)[0]
        if entry.is_symlink() or not entry.is_dir() or kind not in ("tmp", "old"):
            continue
        if kind == "tmp":
            shutil.rmtree(entry, ignore_errors=True)
            print(f"{PROG}: removed {entry}, the unfinished split of an interrupted run", file=sys.stderr)
        else:
            print(f"{PROG}: warning: {entry} holds the split an interrupted run had moved aside; "
                  f"delete it once {dst} is the split you want", file=sys.stderr)


def make_split(src: Path, dst: Path, plan: dict, record: dict, link: str,
               progress: bool = False) -> None:
    """Build the split and ``split.json`` in a temporary folder next to ``dst``,
    then swap it into place. On any failure the temporary folder is removed."""
    dst_abs = dst.resolve()
    try:
        build = Path(tempfile.mkdtemp(prefix=f".{dst_abs.name}.tmp-", dir=dst_abs.parent))
    except OSError as exc:  # a full disk or read-only folder: name --dst, not the temporary folder
        reraise_with_path(exc, dst)
    try:
        build_split(src, build, dst_abs, plan, link, progress)
        atomic_write_json(build / SPLIT_FILE, record)
        swap_into_place(build, dst_abs)
    except BaseException as exc:
        shutil.rmtree(build, ignore_errors=True)
        reraise_with_path(exc, dst)


# --------------------------------------------------------------------------- reporting

def report_skipped(skipped: list[dict]) -> None:
    if not skipped:
        return
    print(f"{PROG}: left out {len(skipped)} file(s):", file=sys.stderr)
    for item in skipped[:MAX_LISTED]:
        print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
    if len(skipped) > MAX_LISTED:
        print(f"  ... and {len(skipped) - MAX_LISTED} more (listed in {SPLIT_FILE})",
              file=sys.stderr)


def count_table(plan: dict) -> list[tuple[str, int, int, int]]:
    """``(class, total, train, val)`` per class."""
    return [(name, len(plan["train"][name]) + len(plan["val"][name]),
             len(plan["train"][name]), len(plan["val"][name]))
            for name in sorted(plan["train"])]


def print_table(rows: list[tuple[str, int, int, int]]) -> None:
    width = max([len("class"), len("total")] + [len(r[0]) for r in rows])
    print(f"{'class':<{width}}  {'total':>6}  {'train':>6}  {'val':>6}")
    print(f"{'-' * width}  {'-' * 6}  {'-' * 6}  {'-' * 6}")
    for name, total, train, val in rows:
        print(f"{name:<{width}}  {total:>6}  {train:>6}  {val:>6}")
    sums = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"{'-' * width}  {'-' * 6}  {'-' * 6}  {'-' * 6}")
    print(f"{'total':<{width}}  {sums[0]:>6}  {sums[1]:>6}  {sums[2]:>6}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    progress = not args.no_progress
    try:
        if not src.is_dir():
            raise SplitError(f"--src {src} does not exist or is not a folder")
        check_destination(src, dst, args.force, args.link)
        clear_interrupted_builds(dst)
        classes, files, skipped = collect_valid_images(src, progress)
        report_skipped(skipped)
        plan = plan_split(files, args.val_fraction, args.seed)
        rows = count_table(plan)
        record = {
            "made_by": PROG, "format": SPLIT_FORMAT,
            "src": os.fspath(src), "src_resolved": os.fspath(src.resolve()),
            "seed": args.seed, "val_fraction": args.val_fraction, "link": args.link,
            "classes": classes,
            "counts": {n: {"total": t, "train": a, "val": b} for n, t, a, b in rows},
            "train": plan["train"], "val": plan["val"],
            "skipped": skipped, "files": written_paths(plan),
        }
        make_split(src, dst, plan, record, args.link, progress)
    except Exception as exc:
        exit_if_known(exc, prefix=f"{PROG}: error: ", known=(SplitError, OSError))
        raise
    print_table(rows)
    print(f"split written to {dst} ({args.link}; seed {args.seed}, "
          f"val fraction {args.val_fraction}); file lists in {dst / SPLIT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
