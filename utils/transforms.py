"""Image transforms and the normalisation statistics they use.

Training: resize to ``img_size`` x ``img_size``, random horizontal and vertical flips,
to tensor, normalise, then Cutout. Cutout is torchvision's ``RandomErasing(p=0.5,
scale=(0.02, 0.4), ratio=(0.4, 2.5), value='random')`` -- the maintained equivalent of
torchtoolbox's ``Cutout`` used by the tutorial (torchtoolbox fails to import with
NumPy >= 1.24). It runs after normalisation so its random fill has the data's scale.
Evaluation: resize, to tensor, normalise.

Mean/std come from ``stats.json`` written by mean_std.py (``{"mean": [r, g, b],
"std": [r, g, b]}``, values in 0..1); without that file ImageNet's are used, and
``load_stats`` says so.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T


def load_stats(path: str | os.PathLike | None) -> tuple[list[float], list[float], str]:
    """``(mean, std, message)`` from a stats.json, or ImageNet's when the file is absent.

    A file that exists but is malformed is an error (ValueError), not a silent fallback.
    """
    if path is None or not Path(path).exists():
        where = f"{path} not found" if path else "no stats file given"
        return (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD),
                f"{where}: normalising with ImageNet mean/std "
                "(run mean_std.py to compute your data's)")
    try:
        with open(path, encoding="utf-8") as fh:
            stats = json.load(fh)
        mean = [float(v) for v in stats["mean"]]
        std = [float(v) for v in stats["std"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read mean/std from {path}: {exc!r} "
                         '(expected {"mean": [r, g, b], "std": [r, g, b]})') from exc
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{path}: mean and std need 3 values each (RGB), "
                         f"got {len(mean)} and {len(std)}")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"{path}: std must be positive and all values finite "
                         f"(mean={mean}, std={std})")
    return mean, std, f"normalising with mean/std from {path}"


def train_transform(img_size: int, mean, std, hflip: float = 0.5, vflip: float = 0.5,
                    cutout: float = 0.5) -> T.Compose:
    steps = [T.Resize((img_size, img_size), antialias=True)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if vflip > 0:
        steps.append(T.RandomVerticalFlip(vflip))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if cutout > 0:
        steps.append(T.RandomErasing(p=cutout, scale=(0.02, 0.4), ratio=(0.4, 2.5),
                                     value="random"))
    return T.Compose(steps)


def eval_transform(img_size: int, mean, std) -> T.Compose:
    return T.Compose([T.Resize((img_size, img_size), antialias=True), T.ToTensor(),
                      T.Normalize(mean, std)])
