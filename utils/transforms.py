"""Image transforms and the normalisation statistics they use.

Training: resize to ``img_size`` x ``img_size`` -- or, with ``scale=(lo, hi)``,
``RandomResizedCrop(img_size, scale, ratio)`` instead -- random horizontal and vertical
flips, with ``transpose > 0`` a random transpose (height and width swapped: with both
flips at 0.5 and transpose at 0.5 all eight rotations and reflections by multiples of 90
degrees are equally likely, exact, with no resampling), with ``rotate > 0`` a
``RandomRotation(rotate)`` (bilinear, black fill), to tensor, normalise, then Cutout.
Cutout is torchvision's ``RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.4, 2.5),
value='random')`` -- the maintained equivalent of torchtoolbox's ``Cutout`` used by the
tutorial (torchtoolbox fails to import with NumPy >= 1.24). It runs after normalisation
so its random fill has the data's scale. Evaluation: resize, to tensor, normalise.
``utils.gpu_data`` repeats the training recipe on the device; ``check_augment``
validates the crop/rotation settings for both.

Mean/std come from ``stats.json`` written by mean_std.py (``{"mean": [r, g, b],
"std": [r, g, b]}``, values in 0..1); without that file ImageNet's are used, and
``load_stats`` says so.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from PIL import Image
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


def check_augment(scale, ratio, rotate) -> tuple[tuple[float, float] | None,
                                                  tuple[float, float], float]:
    """``(scale, ratio, rotate)`` as tuples and float; ValueError for values out of range:
    scale None or 0 < lo <= hi <= 1, ratio 0 < lo <= hi, rotate in [0, 180] degrees."""
    def pair(name, value):
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} needs two numbers (lo, hi), got {value!r}") from exc
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return lo, hi

    if scale is not None:
        scale = pair("scale", scale)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale needs 0 < lo <= hi <= 1 (area fractions), got {scale}")
    ratio = pair("ratio", ratio)
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio needs 0 < lo <= hi (width/height), got {ratio}")
    rotate = float(rotate)
    if not 0 <= rotate <= 180:
        raise ValueError(f"rotate must be in [0, 180] degrees, got {rotate}")
    return scale, ratio, rotate


class RandomTranspose(torch.nn.Module):
    """Swap height and width (a reflection in the main diagonal) with probability p;
    a PIL image or a tensor (..., H, W)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = float(p)

    def forward(self, img):
        if torch.rand(1).item() >= self.p:
            return img
        if isinstance(img, Image.Image):
            return img.transpose(Image.Transpose.TRANSPOSE)
        return img.transpose(-1, -2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def train_transform(img_size: int, mean, std, hflip: float = 0.5, vflip: float = 0.5,
                    cutout: float = 0.5, scale=None, ratio=(3 / 4, 4 / 3),
                    rotate: float = 0.0, transpose: float = 0.0) -> T.Compose:
    scale, ratio, rotate = check_augment(scale, ratio, rotate)
    if scale is None:
        steps = [T.Resize((img_size, img_size), antialias=True)]
    else:
        steps = [T.RandomResizedCrop(img_size, scale=scale, ratio=ratio, antialias=True)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if vflip > 0:
        steps.append(T.RandomVerticalFlip(vflip))
    if transpose > 0:
        steps.append(RandomTranspose(transpose))
    if rotate > 0:
        steps.append(T.RandomRotation(rotate, interpolation=T.InterpolationMode.BILINEAR,
                                      fill=0))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if cutout > 0:
        steps.append(T.RandomErasing(p=cutout, scale=(0.02, 0.4), ratio=(0.4, 2.5),
                                     value="random"))
    return T.Compose(steps)


def eval_transform(img_size: int, mean, std) -> T.Compose:
    return T.Compose([T.Resize((img_size, img_size), antialias=True), T.ToTensor(),
                      T.Normalize(mean, std)])
