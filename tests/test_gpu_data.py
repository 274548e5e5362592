"""utils/gpu_data.py (the GPU-resident data path) on CPU: batch augmentation statistics,
shuffling and sharding, and train.py --gpu-data on end to end."""

from __future__ import annotations

import json
import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import transforms as T

from tests.test_train_test import TINY, read_csv, source, split  # noqa: F401
from utils.gpu_data import (CROP_RATIO, CUTOUT_RATIO, CUTOUT_SCALE, GpuLoader, augment_args,
                            choose_gpu_data, compose_theta, cutout_masks, decode_images,
                            flip_batch, random_affine_theta, shard_indices, warp_batch)
from utils.images import open_rgb
from utils.transforms import eval_transform, train_transform


def test_flips_exact_per_sample():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    y = flip_batch(x, 0.5, 0.5)
    kinds = []
    for a, b in zip(x, y):
        options = [a, a.flip(-1), a.flip(-2), a.flip(-1).flip(-2)]
        matches = [i for i, o in enumerate(options) if torch.equal(o, b)]
        assert len(matches) == 1
        kinds.append(matches[0])
    counts = torch.bincount(torch.tensor(kinds), minlength=4).float() / len(kinds)
    assert torch.all((counts - 0.25).abs() < 0.08), counts
    assert torch.equal(flip_batch(x, 0.0, 0.0), x)
    assert torch.equal(flip_batch(x, 1.0, 0.0), x.flip(-1))


def dihedral(a: torch.Tensor) -> list[torch.Tensor]:
    """The eight rotations/reflections of a square image by multiples of 90 degrees."""
    flips = [a, a.flip(-1), a.flip(-2), a.flip(-1).flip(-2)]
    return flips + [f.transpose(-1, -2) for f in flips]


def test_flips_and_transposes_cover_all_eight_orientations():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (800, 3, 8, 8), dtype=torch.uint8)
    y = flip_batch(x, 0.5, 0.5, transpose=0.5)
    kinds = []
    for a, b in zip(x, y):
        matches = [i for i, o in enumerate(dihedral(a)) if torch.equal(o, b)]
        assert len(matches) == 1
        kinds.append(matches[0])
    counts = torch.bincount(torch.tensor(kinds), minlength=8).float() / len(kinds)
    assert torch.all((counts - 0.125).abs() < 0.05), counts
    assert torch.equal(flip_batch(x, 0.0, 0.0, transpose=1.0), x.transpose(-1, -2))
    with pytest.raises(ValueError, match="square"):
        flip_batch(torch.zeros(2, 3, 4, 6), 0.5, 0.5, transpose=0.5)


def test_random_transpose_dataloader_path():
    from utils.transforms import RandomTranspose

    img = Image.fromarray(torch.randint(0, 256, (6, 6, 3), dtype=torch.uint8).numpy())
    t = TF.pil_to_tensor(img)
    assert torch.equal(TF.pil_to_tensor(RandomTranspose(1.0)(img)), t.transpose(-1, -2))
    assert RandomTranspose(0.0)(img) is img
    assert torch.equal(RandomTranspose(1.0)(t), t.transpose(-1, -2))
    steps = [type(s) for s in train_transform(24, MEAN, STD, transpose=0.5).transforms]
    assert RandomTranspose in steps
    assert RandomTranspose not in [type(s) for s in train_transform(24, MEAN, STD).transforms]


def test_cutout_masks_match_random_erasing_bounds():
    torch.manual_seed(0)
    n, h, w = 4000, 64, 48
    masks = cutout_masks(n, h, w, 0.5, "cpu")[:, 0]
    erased = masks.flatten(1).any(1)
    assert abs(erased.float().mean().item() - 0.5) < 0.04
    fractions = []
    for m in masks[erased]:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        eh, ew = len(rows), len(cols)
        # one solid rectangle, inside the image
        assert rows[-1] - rows[0] + 1 == eh and cols[-1] - cols[0] + 1 == ew
        assert m.sum() == eh * ew and eh < h and ew < w
        fractions.append(eh * ew / (h * w))
        # rounding of the sides widens the aspect-ratio bounds a little
        assert CUTOUT_RATIO[0] * 0.7 < eh / ew < CUTOUT_RATIO[1] / 0.7
    f = torch.tensor(fractions)
    assert f.min() >= CUTOUT_SCALE[0] * 0.75 and f.max() <= CUTOUT_SCALE[1] * 1.1
    assert f.min() < 0.04 and f.max() > 0.3  # the whole range is used
    assert not cutout_masks(50, h, w, 0.0, "cpu").any()


def test_shuffle_deterministic_and_equal_to_distributed_sampler():
    n = 23
    a, b = shard_indices(n, 3, 42), shard_indices(n, 3, 42)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(n))
    assert not torch.equal(a, shard_indices(n, 4, 42))
    assert not torch.equal(a, shard_indices(n, 3, 7))
    for world in (1, 2, 3):
        for rank in range(world):
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                     seed=42, drop_last=False)
            ref.set_epoch(3)
            assert shard_indices(n, 3, 42, rank, world).tolist() == list(ref)


def test_two_rank_shards_disjoint_and_covering():
    for n in (20, 21):
        s0, s1 = (set(shard_indices(n, 1, 0, r, 2).tolist()) for r in (0, 1))
        assert s0 | s1 == set(range(n))
        assert len(s0 & s1) == (n % 2)  # an odd count pads one duplicate, as DDP does
        assert len(shard_indices(n, 1, 0, 0, 2)) == len(shard_indices(n, 1, 0, 1, 2))


def test_loader_batches():
    images = torch.randint(0, 256, (21, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(21)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    train = GpuLoader(images, labels, 4, mean, std, train=True, seed=1, hflip=0.5,
                      vflip=0.5, cutout=0.5)
    train.set_epoch(2)
    batches = list(train)
    assert len(batches) == len(train) == 5  # 21 // 4, last incomplete batch dropped
    assert all(x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 for x, _ in batches)
    val = GpuLoader(images, labels, 4, mean, std, train=False, order=range(21))
    xs, ys = zip(*val)
    assert len(val) == 6 and torch.equal(torch.cat(ys), labels)
    ref = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / \
        torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(torch.cat(xs), ref, atol=1e-6)


def test_decoded_batches_equal_the_dataloader_transform(split):  # noqa: F811
    files = sorted(p for p in (split / "val").rglob("*") if p.is_file())[:4]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    images, labels = decode_images([(str(f), 0) for f in files], 40, torch.device("cpu"))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 40, 40)
    (x, _), = GpuLoader(images, labels, 4, mean, std, train=False, order=range(4))
    ref = torch.stack([eval_transform(40, mean, std)(open_rgb(f)) for f in files])
    assert torch.allclose(x, ref, atol=1e-5)


def test_auto_is_off_on_cpu():
    assert choose_gpu_data("auto", torch.device("cpu"), 10)[0] is False
    assert choose_gpu_data("on", torch.device("cpu"), 10**15)[0] is True
    assert choose_gpu_data("off", torch.device("cpu"), 10)[0] is False


@pytest.mark.slow
def test_train_gpu_data_on_cpu_and_resume_exact(train_script, tmp_path, split,  # noqa: F811
                                                monkeypatch):
    common = ["--data", split, "--epochs", "2", "--warmup-epochs", "0.5", "--mixup-prob",
              "0.5", "--ema-decay", "0.99", "--gpu-data", "on", *TINY,
              "--max-val-batches", "1"]
    out = tmp_path / "straight"
    train_script.main([str(a) for a in common + ["--output", out]])
    args = json.loads((out / "args.json").read_text())
    assert args["gpu_data"] == "on" and args["run"]["data_path"].startswith("GPU-resident")
    for name in ("best.pth", "last.pth", "report.txt", "report.json", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    val_images = [p for p in (split / "val").rglob("*") if p.is_file()]
    assert json.loads((out / "report.json").read_text())  # the report covers all of val
    assert f"{len(val_images)} images" in (out / "report.txt").read_text()
    assert "GPU-resident" in (out / "train.log").read_text()

    # stopped after epoch 1 and resumed == trained 2 epochs without a break
    real = train_script.train_one_epoch

    def stop_at_epoch_2(*a, **k):
        if a[7] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_script, "train_one_epoch", stop_at_epoch_2)
    try:
        train_script.main([str(a) for a in common + ["--output", tmp_path / "broken"]])
    except SystemExit as exc:
        assert exc.code == 130  # interrupted (the message goes to stderr)
    monkeypatch.setattr(train_script, "train_one_epoch", real)
    train_script.main(["--resume", str(tmp_path / "broken" / "last.pth")])
    a = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "broken" / "last.pth", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    for key in ("model", "model_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    assert read_csv(out / "metrics.csv")[1]["train_loss"] == \
        read_csv(tmp_path / "broken" / "metrics.csv")[1]["train_loss"]
    assert math.isfinite(float(read_csv(out / "metrics.csv")[1]["val_loss"]))


def test_train_gpu_data_max_train_batches(train_script, tmp_path, split):  # noqa: F811
    out = tmp_path / "run"
    train_script.main([str(a) for a in ["--data", split, "--epochs", "1", "--gpu-data", "on",
                                        *TINY, "--max-train-batches", "1",
                                        "--output", out]])
    args = json.loads((out / "args.json").read_text())
    assert args["run"]["steps_per_epoch"] == 1
    assert (out / "best.pth").is_file()


# --- random resized crop and rotation (the affine path) ---------------------------------

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def normalized(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(STD).view(1, 3, 1, 1)


def one_theta(h, w, top=0, left=0, ch=None, cw=None, angle_deg=0.0, hflip=False,
              vflip=False):
    """theta (1, 2, 3) for fixed parameters."""
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    return compose_theta(t(top), t(left), t(h if ch is None else ch), t(w if cw is None else cw),
                         torch.tensor([hflip]), torch.tensor([vflip]),
                         t(math.radians(angle_deg)), h, w)


def test_identity_crop_reproduces_pixels_up_to_flips():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    # scale given forces the warp; the full-image square crop is the identity
    loader = GpuLoader(x, torch.arange(64), 64, MEAN, STD, train=True, hflip=0.5, vflip=0.5,
                       scale=(1, 1), ratio=(1, 1))
    (y, order), = loader
    ref = normalized(x)[order]
    kinds = []
    for a, b in zip(ref, y):
        options = [a, a.flip(-1), a.flip(-2), a.flip(-1).flip(-2)]
        kinds += [i for i, o in enumerate(options) if (o - b).abs().max() < 1e-4]
    assert len(kinds) == 64 and len(set(kinds)) == 4  # one match each, all kinds seen


def test_rotation_matches_rot90_and_torchvision():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 12) * 255  # asymmetric
    y = warp_batch(x, one_theta(12, 12, angle_deg=90).expand(2, 2, 3))
    assert (y - torch.rot90(x, 1, (-2, -1))).abs().max() < 1e-3
    # the same sense and centre as the DataLoader path's RandomRotation, also for h != w
    x = torch.rand(1, 3, 12, 16) * 255
    y = warp_batch(x, one_theta(12, 16, angle_deg=30))
    ref = TF.rotate(x, 30.0, T.InterpolationMode.BILINEAR)
    assert (y - ref)[..., 3:-3, 3:-3].abs().max() < 1e-3
    # outside the rotated image is black (fill=0)
    white = torch.full((1, 3, 16, 16), 255.0)
    y = warp_batch(white, one_theta(16, 16, angle_deg=45))
    assert y[..., 0, 0].max() == 0 and y[..., 8, 8].min() > 254.9


def test_crop_is_an_upsampled_window_like_resized_crop():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 10, 10) * 255
    for top, left, ch, cw in ((0, 0, 5, 5), (2, 3, 5, 4), (5, 5, 5, 5)):
        y = warp_batch(x, one_theta(10, 10, top, left, ch, cw))
        ref = TF.resized_crop(x, top, left, ch, cw, [10, 10], T.InterpolationMode.BILINEAR,
                              antialias=True)
        # the border pixels of an interior crop also see the neighbouring pixels
        assert (y - ref)[..., 1:-1, 1:-1].abs().max() < 1e-3
    # random quarter-area squares: each output is a 2x upsampling of some 8x8 window
    img = torch.rand(1, 3, 16, 16) * 255
    windows = {(t, l): F.interpolate(img[..., t:t + 8, l:l + 8], scale_factor=2,
                                     mode="bilinear", align_corners=False)
               for t in range(9) for l in range(9)}
    theta = random_affine_theta(200, 16, 16, "cpu", scale=(0.25, 0.25), ratio=(1, 1))
    out = warp_batch(img.expand(200, -1, -1, -1), theta)
    found = set()
    for y in out:
        match = [k for k, w in windows.items() if (w[0] - y)[:, 1:-1, 1:-1].abs().max() < 1e-3]
        assert len(match) == 1
        found.add(match[0])
    assert len(found) > 40  # positions spread over the 81 possible


def test_transpose_in_the_affine_path():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 12, 12) * 255
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    theta = compose_theta(t(0), t(0), t(12), t(12), torch.tensor([False]),
                          torch.tensor([True]), t(0), 12, 12, torch.tensor([True]))
    # vertical flip, then transpose: a quarter turn
    assert (warp_batch(x, theta) - x.flip(-2).transpose(-1, -2)).abs().max() < 1e-3
    theta = compose_theta(t(0), t(0), t(12), t(12), torch.tensor([False]),
                          torch.tensor([False]), t(math.radians(30)), 12, 12,
                          torch.tensor([True]))
    ref = TF.rotate(x.transpose(-1, -2), 30.0, T.InterpolationMode.BILINEAR)
    assert (warp_batch(x, theta) - ref)[..., 3:-3, 3:-3].abs().max() < 1e-3
    # through the loader: a full-image crop with flips and transposes gives all 8
    x = torch.randint(0, 256, (96, 3, 12, 12), dtype=torch.uint8)
    loader = GpuLoader(x, torch.arange(96), 96, MEAN, STD, train=True, hflip=0.5, vflip=0.5,
                       transpose=0.5, scale=(1, 1), ratio=(1, 1))
    (y, order), = loader
    kinds = set()
    for a, b in zip(normalized(x)[order], y):
        match = [i for i, o in enumerate(dihedral(a)) if (o - b).abs().max() < 1e-4]
        assert len(match) == 1
        kinds.add(match[0])
    assert kinds == set(range(8))


def test_random_theta_statistics():
    torch.manual_seed(0)
    n, h, w, lo, hi = 4000, 32, 32, 0.2, 0.6
    theta = random_affine_theta(n, h, w, "cpu", scale=(lo, hi), ratio=CROP_RATIO)
    sx, sy, tx, ty = theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    area = sx * sy
    assert lo < area.mean() < hi and abs(area.mean() - (lo + hi) / 2) < 0.02
    assert area.min() > lo * 0.9 and area.max() < hi * 1.1  # up to rounding to pixels
    assert area.min() < lo * 1.05 and area.max() > hi * 0.95
    aspect = sx / sy  # width / height
    assert aspect.min() > CROP_RATIO[0] * 0.9 and aspect.max() < CROP_RATIO[1] * 1.1
    # inside the image, and positions spread across it
    assert ((tx.abs() + sx) <= 1 + 1e-6).all() and ((ty.abs() + sy) <= 1 + 1e-6).all()
    assert tx.min() < -0.3 and tx.max() > 0.3
    # a box that cannot fit (twice as wide as the image) is clamped to it
    wide = random_affine_theta(100, h, w, "cpu", scale=(1, 1), ratio=(4, 4))
    assert ((wide[:, 0, 2].abs() + wide[:, 0, 0]) <= 1 + 1e-6).all()
    assert torch.allclose(wide[:, 0, 0], torch.ones(100))

    theta = random_affine_theta(n, h, w, "cpu", rotate=25.0)
    angle = torch.atan2(theta[:, 1, 0], theta[:, 0, 0]).rad2deg()
    assert angle.abs().max() <= 25 + 1e-4 and angle.min() < -24 and angle.max() > 24
    assert abs(angle.mean()) < 1.5
    assert torch.allclose(theta[:, :, 2], torch.zeros(n, 2))  # about the centre

    theta = random_affine_theta(n, h, w, "cpu", hflip=0.5, vflip=0.2)
    assert abs((theta[:, 0, 0] < 0).float().mean() - 0.5) < 0.04
    assert abs((theta[:, 1, 1] < 0).float().mean() - 0.2) < 0.04


def test_affine_path_deterministic_per_seed():
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)

    def batches(seed):
        torch.manual_seed(seed)
        loader = GpuLoader(x, torch.arange(16), 8, MEAN, STD, train=True, hflip=0.5,
                           vflip=0.5, cutout=0.5, scale=(0.3, 1), rotate=20)
        return [b for b, _ in loader]

    a, b, c = batches(3), batches(3), batches(4)
    assert len(a) == 2 and all(u.shape == (8, 3, 12, 12) for u in a)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_train_transform_crop_rotate_and_bad_values():
    img = Image.new("RGB", (50, 30), (200, 100, 50))
    tf = train_transform(24, MEAN, STD, scale=(0.3, 1.0), ratio=(0.5, 2.0), rotate=15)
    kinds = [type(step) for step in tf.transforms]
    assert kinds[0] is T.RandomResizedCrop and T.RandomRotation in kinds
    rot = tf.transforms[kinds.index(T.RandomRotation)]
    assert rot.degrees == [-15.0, 15.0] and rot.interpolation == T.InterpolationMode.BILINEAR
    assert tf(img).shape == (3, 24, 24)
    plain = [type(step) for step in train_transform(24, MEAN, STD).transforms]
    assert plain[0] is T.Resize and T.RandomRotation not in plain
    bad = [dict(scale=(0, 1)), dict(scale=(0.6, 0.5)), dict(scale=(0.5, 1.5)),
           dict(scale=(0.5,)), dict(ratio=(0, 1)), dict(ratio=(2, 1)), dict(rotate=-1),
           dict(rotate=181)]
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    for kw in bad:
        with pytest.raises(ValueError):
            train_transform(24, MEAN, STD, **kw)
        with pytest.raises(ValueError):
            GpuLoader(x, torch.arange(2), 2, MEAN, STD, train=True, **kw)


def test_augment_args_from_train_flags():
    assert augment_args(Namespace()) == dict(scale=None, ratio=CROP_RATIO, rotate=0.0,
                                             transpose=0.0)
    args = Namespace(scale=[0.08, 1.0], ratio=[0.5, 2.0], rotate=10.0)
    assert augment_args(args) == dict(scale=(0.08, 1.0), ratio=(0.5, 2.0), rotate=10.0,
                                      transpose=0.0)
