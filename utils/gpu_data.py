"""GPU-resident data for small data sets (DESIGN habit 9, hlb-CIFAR10 style).

Every image is decoded once (``utils.images.open_rgb``), resized to ``img_size`` x
``img_size`` with the same ``Resize`` as the DataLoader path, and kept as one uint8
tensor ``(N, 3, H, W)`` on the device. Under torchrun each rank decodes a share of the images and
an all-gather gives every rank all of them (``decode_split``). Batches are then augmented on the device, in
batches, with the DataLoader path's recipe (``utils.transforms.train_transform``):
random horizontal/vertical flips and transposes per sample, scaling to 0..1 and
normalisation, then Cutout matching torchvision's ``RandomErasing(p, scale=(0.02,
0.4), ratio=(0.4, 2.5), value='random')`` per sample (one rectangle per image, drawn
as a mask). Mixup/CutMix stay in the training loop. Validation batches are only
normalised.

With a random resized crop (``scale``/``ratio``) or a rotation (``rotate`` degrees) the
crop, the flips, the transpose and the rotation of each sample are folded into one
affine matrix and the batch is warped once (``affine_grid`` + bilinear ``grid_sample``,
black outside the image) on float pixels, before normalisation. The crop is drawn like
``RandomResizedCrop.get_params``'s first attempt (clamped to the image when it does not
fit, instead of retrying); unlike the DataLoader path it crops the stored ``img_size``
square, not the original image, so the aspect ratio is relative to the squashed image.
Crops never shrink, so no antialiasing is lost. Without crop and rotation the flips and
transposes stay exact pixel moves (``flip_batch``).

Shuffling repeats ``DistributedSampler(shuffle=True, seed, drop_last=False)`` exactly:
a permutation from a generator seeded with ``seed + epoch``, padded with its own start
to a multiple of the world size, rank r taking positions r, r + world, ... ; the last
incomplete batch is dropped. The random augmentation draws from the device's global
generator, which checkpoints save, so --resume continues exactly.

``GpuLoader`` looks like a DataLoader to ``utils.engine`` (``len`` and iteration
yielding ``(images, labels)``) and like a sampler to train.py (``set_epoch``).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision import transforms as T

from utils.datasets import DatasetError, SkippedImages
from utils.distributed import all_reduce_sums
from utils.images import ImageReadError, open_rgb
from utils.transforms import check_augment

GPU_DATA_MODES = ("auto", "on", "off")
AUTO_FRACTION = 0.25  # auto: on when the decoded images take less than this of free memory
CUTOUT_SCALE = (0.02, 0.4)
CUTOUT_RATIO = (0.4, 2.5)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios


def decoded_bytes(num_images: int, img_size: int) -> int:
    return int(num_images) * 3 * int(img_size) ** 2


def choose_gpu_data(mode: str, device: torch.device, nbytes: int) -> tuple[bool, str]:
    """``(use it, why)``; auto: on for CUDA when ``nbytes`` < AUTO_FRACTION of free memory."""
    if mode == "on":
        return True, "--gpu-data on"
    if mode == "off":
        return False, "--gpu-data off"
    if device.type != "cuda":
        return False, f"--gpu-data auto on {device.type}"
    free, _ = torch.cuda.mem_get_info(device)
    verdict = "<" if nbytes < AUTO_FRACTION * free else ">="
    return verdict == "<", (f"--gpu-data auto: {nbytes / 2**30:.2f} GiB of images {verdict} "
                            f"{AUTO_FRACTION:.0%} of {free / 2**30:.1f} GiB free")


def decode_images(samples: Sequence[tuple[str, int]], img_size: int, device: torch.device,
                  threads: int = 4, skipped: Optional[SkippedImages] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images (N, 3, S, S), int64 labels (N,))`` on ``device``. With ``skipped``,
    an image that cannot be decoded is recorded there and the next readable one (and its
    label) takes its place, as ``ImageDataset`` does; without, ``ImageReadError``."""
    resize = T.Resize((img_size, img_size), antialias=True)
    # decoded into one numpy array, channels last, and made channels-first on the device
    # in one go, instead of one strided torch copy per image on the CPU
    pixels = np.empty((len(samples), img_size, img_size, 3), dtype=np.uint8)
    labels = [label for _, label in samples]

    def one(item: tuple[int, str]) -> Optional[str]:
        i, path = item
        try:
            pixels[i] = np.asarray(resize(open_rgb(path)))
        except ImageReadError as exc:
            if skipped is None:
                raise
            skipped.note(path, str(exc))
            return path
        return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        failed = [i for i, bad in enumerate(pool.map(one, enumerate(p for p, _ in samples))) if bad]
    readable = sorted(set(range(len(samples))) - set(failed))
    if failed and not readable:
        raise DatasetError(f"none of the {len(samples)} images of this split can be read")
    for i in failed:
        j = next((k for k in readable if k > i), readable[0])
        pixels[i], labels[i] = pixels[j], labels[j]
    images = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.long).to(device)


def decode_split(samples: Sequence[tuple[str, int]], img_size: int, env, threads: int = 4,
                 skipped: Optional[SkippedImages] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_images` with the work shared by the ranks under torchrun: each decodes
    a contiguous share, and an all-gather gives every rank every image (each keeps the
    whole split, as every epoch deals the training images out afresh). An unreadable
    image is replaced within its share; the images each rank skipped are reported to
    rank 0's ``skipped``. ``env``: a ``utils.distributed.DistEnv``."""
    if not env.distributed:
        return decode_images(samples, img_size, env.device, threads, skipped)
    per = math.ceil(len(samples) / env.world_size)
    share = samples[env.rank * per:(env.rank + 1) * per]
    images = torch.zeros((per, 3, img_size, img_size), dtype=torch.uint8, device=env.device)
    labels = torch.zeros(per, dtype=torch.long, device=env.device)
    unreadable = 0.0
    try:
        decoded = decode_images(share, img_size, env.device, threads, skipped)
        images[:len(share)], labels[:len(share)] = decoded
    except DatasetError:  # all of this share: every rank stops, below
        unreadable = 1.0
    found = dict(skipped.found) if skipped is not None else {}
    if all_reduce_sums([unreadable], env)[0]:
        raise DatasetError(f"one process's share of this split ({per} of its {len(samples)} images) has no "
                           "readable image; check the image files (--check-images full lists them)")
    all_images = torch.empty((per * env.world_size, *images.shape[1:]), dtype=images.dtype, device=env.device)
    all_labels = torch.empty(per * env.world_size, dtype=labels.dtype, device=env.device)
    dist.all_gather(list(all_images.split(per)), images)
    dist.all_gather(list(all_labels.split(per)), labels)
    _gather_skipped(found, skipped, env)
    return all_images[:len(samples)], all_labels[:len(samples)]


def _gather_skipped(found: dict, skipped: Optional[SkippedImages], env) -> None:
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, found, group=env.main_group)
    if skipped is not None:
        for entries in everyone:
            for path, reason in entries.items():
                skipped.found.setdefault(path, reason)


def shard_indices(n: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """This rank's shuffled indices for ``epoch``, as DistributedSampler(drop_last=False)."""
    gen = torch.Generator().manual_seed(int(seed) + int(epoch))
    order = torch.randperm(n, generator=gen)
    total = math.ceil(n / world_size) * world_size
    if total > n:  # pad with the permutation's start (repeated if needed)
        order = torch.cat([order] * math.ceil(total / n))[:total]
    return order[rank:total:world_size]


def flip_batch(x: torch.Tensor, hflip: float, vflip: float,
               transpose: float = 0.0) -> torch.Tensor:
    """Flip each image left-right with probability hflip and up-down with vflip, then
    swap its height and width with probability transpose (square images only)."""
    n = x.shape[0]
    if hflip > 0:
        m = (torch.rand(n, device=x.device) < hflip).view(n, 1, 1, 1)
        x = torch.where(m, x.flip(-1), x)
    if vflip > 0:
        m = (torch.rand(n, device=x.device) < vflip).view(n, 1, 1, 1)
        x = torch.where(m, x.flip(-2), x)
    if transpose > 0:
        _check_square(x.shape[-2], x.shape[-1])
        m = (torch.rand(n, device=x.device) < transpose).view(n, 1, 1, 1)
        x = torch.where(m, x.transpose(-1, -2), x)
    return x


def _check_square(h: int, w: int) -> None:
    if h != w:
        raise ValueError(f"a random transpose needs square images, got {h} x {w}")


def cutout_masks(n: int, h: int, w: int, p: float, device, scale=CUTOUT_SCALE,
                 ratio=CUTOUT_RATIO, attempts: int = 10) -> torch.Tensor:
    """Bool masks (n, 1, h, w): one rectangle per erased image, drawn like
    RandomErasing.get_params (10 attempts; the first that fits is used; none: no erase)."""
    area = h * w
    erase_area = area * torch.empty(n, attempts, device=device).uniform_(*scale)
    log_r = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]),
                                                             math.log(ratio[1]))
    aspect = log_r.exp()
    eh = (erase_area * aspect).sqrt().round().long()
    ew = (erase_area / aspect).sqrt().round().long()
    fits = (eh < h) & (ew < w)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros_like(fits[:, 0],
                                                                                dtype=torch.long))
    eh = eh.gather(1, first[:, None]).squeeze(1)
    ew = ew.gather(1, first[:, None]).squeeze(1)
    do = (torch.rand(n, device=device) < p) & fits.any(1)
    top = (torch.rand(n, device=device) * (h - eh + 1)).long()
    left = (torch.rand(n, device=device) * (w - ew + 1)).long()
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = in_rows[:, :, None] & in_cols[:, None, :] & do[:, None, None]
    return mask[:, None]


def cutout_batch(x: torch.Tensor, p: float) -> torch.Tensor:
    """RandomErasing(p, value='random') per image of a normalised float batch."""
    if p <= 0:
        return x
    mask = cutout_masks(x.shape[0], x.shape[-2], x.shape[-1], p, x.device)
    return torch.where(mask, torch.randn_like(x), x)


def crop_boxes(n: int, h: int, w: int, scale, ratio, device) -> tuple[torch.Tensor, ...]:
    """``(top, left, height, width)`` float tensors (n,) in pixels, drawn like
    RandomResizedCrop.get_params's first attempt; a box too big is clamped to the image."""
    area = h * w * torch.empty(n, device=device).uniform_(*scale)
    aspect = torch.empty(n, device=device).uniform_(math.log(ratio[0]),
                                                    math.log(ratio[1])).exp()
    ch = (area / aspect).sqrt().round().clamp(1, h)
    cw = (area * aspect).sqrt().round().clamp(1, w)
    top = (torch.rand(n, device=device) * (h - ch + 1)).floor()
    left = (torch.rand(n, device=device) * (w - cw + 1)).floor()
    return top, left, ch, cw


def compose_theta(top, left, ch, cw, hflip, vflip, angle, h: int, w: int,
                  transpose=None) -> torch.Tensor:
    """``affine_grid`` theta (n, 2, 3) for an h x w output of an h x w input that is
    cropped to the box, flipped where ``hflip``/``vflip`` (bool), transposed where
    ``transpose`` (bool, square images only), then rotated by ``angle`` radians
    counter-clockwise (torchvision's sense), about the centre.

    theta maps output to input coordinates (-1..1, align_corners=False), so the steps
    compose in reverse: inverse rotation, then transpose, then flip, then the crop's
    scale and shift."""
    cos, sin = angle.cos(), angle.sin()
    # inverse rotation in pixels, rescaled to normalised coordinates (h != w)
    r0 = torch.stack([cos, -sin * (h / w)], -1)
    r1 = torch.stack([sin * (w / h), cos], -1)
    if transpose is not None:
        _check_square(h, w)
        swap = transpose.view(-1, 1)  # a transpose swaps the rows of the inverse rotation
        r0, r1 = torch.where(swap, r1, r0), torch.where(swap, r0, r1)
    sx = (cw / w) * (1 - 2 * hflip.to(cw.dtype))
    sy = (ch / h) * (1 - 2 * vflip.to(ch.dtype))
    tx = (2 * left + cw) / w - 1  # crop centre
    ty = (2 * top + ch) / h - 1
    row0 = torch.cat([sx[:, None] * r0, tx[:, None]], -1)
    row1 = torch.cat([sy[:, None] * r1, ty[:, None]], -1)
    return torch.stack([row0, row1], 1)


def random_affine_theta(n: int, h: int, w: int, device, *, scale=None, ratio=CROP_RATIO,
                        hflip: float = 0.0, vflip: float = 0.0, rotate: float = 0.0,
                        transpose: float = 0.0) -> torch.Tensor:
    """theta (n, 2, 3) of a random resized crop (``scale`` None: the whole image), flips,
    transposes and a rotation uniform in [-rotate, rotate] degrees, all from the global
    generator."""
    if scale is None:
        zero = torch.zeros(n, device=device)
        top, left, ch, cw = zero, zero, zero + h, zero + w
    else:
        top, left, ch, cw = crop_boxes(n, h, w, scale, ratio, device)
    flip_h = torch.rand(n, device=device) < hflip
    flip_v = torch.rand(n, device=device) < vflip
    angle = torch.empty(n, device=device).uniform_(-rotate, rotate).deg2rad_()
    swap = torch.rand(n, device=device) < transpose if transpose > 0 else None
    return compose_theta(top, left, ch, cw, flip_h, flip_v, angle, h, w, swap)


def warp_batch(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Float images (N, C, H, W) sampled through theta at the same size, bilinear, black
    outside. A one-pixel edge border first: an upsampled crop at the image edge samples
    up to half a pixel outside, which should see the edge (as a resize does), not black."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    # the same points in the padded image's normalised coordinates
    theta = theta * theta.new_tensor([w / (w + 2), h / (h + 2)]).view(1, 2, 1)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def normalize_batch(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) (N, 3, H, W) -> float, scaled to 0..1 and normalised
    like ToTensor+Normalize."""
    return (x.float().div_(255) - mean) / std


class GpuLoader:
    """Batches from device-resident uint8 images (train: shuffled shard, augmented,
    last incomplete batch dropped; eval: a fixed order, all images, normalised only)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mean, std, *, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, order: Optional[Sequence[int]] = None,
                 hflip: float = 0.0, vflip: float = 0.0, cutout: float = 0.0,
                 scale=None, ratio=CROP_RATIO, rotate: float = 0.0, transpose: float = 0.0):
        self.images, self.labels, self.batch_size = images, labels, int(batch_size)
        self.mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.hflip, self.vflip, self.cutout, self.transpose = hflip, vflip, cutout, transpose
        self.scale, self.ratio, self.rotate = check_augment(scale, ratio, rotate)
        self.order = None if order is None else torch.as_tensor(list(order), dtype=torch.long)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def num_samples(self) -> int:
        n = len(self.labels)
        return math.ceil(n / self.world_size) if self.train else len(self.order)

    def __len__(self) -> int:
        if self.train:
            return self.num_samples() // self.batch_size
        return math.ceil(self.num_samples() / self.batch_size)

    def indices(self) -> torch.Tensor:
        if self.train:
            return shard_indices(len(self.labels), self.epoch, self.seed, self.rank,
                                 self.world_size)
        return self.order

    def __iter__(self):
        idx = self.indices().to(self.images.device)
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[sel]
            if self.train:
                x = self.augment(x)
            else:
                x = normalize_batch(x, self.mean, self.std)
            yield x, self.labels[sel]

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 training batch -> augmented, normalised float batch."""
        if self.scale is None and self.rotate == 0:
            # exact flips and transposes, no resampling
            x = flip_batch(x, self.hflip, self.vflip, self.transpose)
        else:
            n, _, h, w = x.shape
            theta = random_affine_theta(n, h, w, x.device, scale=self.scale,
                                        ratio=self.ratio, hflip=self.hflip,
                                        vflip=self.vflip, rotate=self.rotate,
                                        transpose=self.transpose)
            # warp before normalising, so the zero fill is black as in torchvision
            x = warp_batch(x.float(), theta)
        x = normalize_batch(x, self.mean, self.std)
        return cutout_batch(x, self.cutout)


def augment_args(args) -> dict:
    """Crop/rotation/transpose settings from train.py's args (absent or None: off / the
    default; runs saved before an option existed lack it)."""
    scale = getattr(args, "scale", None)
    return dict(scale=None if scale is None else tuple(scale),
                ratio=tuple(getattr(args, "ratio", None) or CROP_RATIO),
                rotate=getattr(args, "rotate", None) or 0.0,
                transpose=getattr(args, "transpose", None) or 0.0)


def build_gpu_loaders(args, train_split, val_split, mean, std, env, val_order,
                      val_batch_size: int, skipped: Optional[SkippedImages] = None):
    """Train and val GpuLoaders on ``env.device`` (decodes every image once)."""
    threads = max(2, args.workers)
    tx, ty = decode_split(train_split.samples, args.img_size, env, threads, skipped)
    vx, vy = decode_split(val_split.samples, args.img_size, env, threads, skipped)
    train = GpuLoader(tx, ty, args.batch_size, mean, std, train=True, seed=args.seed,
                      rank=env.rank, world_size=env.world_size, hflip=args.hflip,
                      vflip=args.vflip, cutout=args.cutout, **augment_args(args))
    val = GpuLoader(vx, vy, val_batch_size, mean, std, train=False, order=val_order)
    return train, val


def full_eval_loader(loader: GpuLoader) -> GpuLoader:
    """Every image of an eval GpuLoader, in file order (for the final report)."""
    return GpuLoader(loader.images, loader.labels, loader.batch_size,
                     loader.mean.flatten().tolist(), loader.std.flatten().tolist(),
                     train=False, order=range(len(loader.labels)))
