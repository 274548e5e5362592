"""utils/gpu_data.py (the GPU-resident data path) on CPU: batch augmentation statistics,
shuffling and sharding, and train.py --gpu-data on end to end."""

from __future__ import annotations

import json
import math

import torch
from torch.utils.data import DistributedSampler

from tests.test_train_test import TINY, read_csv, source, split, train_script  # noqa: F401
from utils.gpu_data import (CUTOUT_RATIO, CUTOUT_SCALE, GpuLoader, choose_gpu_data,
                            cutout_masks, decode_images, flip_batch, shard_indices)
from utils.images import open_rgb
from utils.transforms import eval_transform


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
        assert "interrupted" in str(exc.code)
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
