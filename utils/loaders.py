"""The training and validation batches of a run: GPU-resident or from a DataLoader.

Small data sets on a GPU are decoded once and augmented there in batches
(:mod:`utils.gpu_data`); everything else goes through a DataLoader with the same
recipe (:mod:`utils.transforms`). Both shuffle like ``DistributedSampler`` with the
run's seed, drop the last incomplete training batch and shard validation so that
every image is seen exactly once across ranks.
"""
from __future__ import annotations

import math

from torch.utils.data import DataLoader, DistributedSampler

from utils.datasets import ImageDataset, SkippedImages
from utils.distributed import DistEnv, ShardSampler, broadcast_object
from utils.gpu_data import GpuLoader, build_gpu_loaders, choose_gpu_data, decoded_bytes, full_eval_loader
from utils.interrupt import ignore_sigint
from utils.transforms import eval_transform, train_transform

__all__ = ["build_loaders", "report_loader"]


def _check_batch(n: int, per_rank: int, batch_size: int, env: DistEnv) -> None:
    if per_rank < batch_size:
        raise SystemExit(
            f"error: {n} training images" + (f" ({per_rank} per process)" if env.distributed else "")
            + f" are fewer than --batch-size {batch_size}; lower --batch-size "
            "(the last incomplete batch is always dropped)")


def build_loaders(config, train_split, val_split, mean, std, env: DistEnv,
                  skipped: SkippedImages | None = None):
    """``(train loader, val loader, sampler with set_epoch, description of the data path)``;
    images that fail to decode while loading are recorded in ``skipped`` and replaced."""
    nbytes = decoded_bytes(len(train_split.samples) + len(val_split.samples), config.img_size)
    # rank 0 decides for all (free memory may differ between GPUs)
    on, why = broadcast_object(choose_gpu_data(config.gpu_data, env.device, nbytes), env)
    val_order = ShardSampler(len(val_split.samples), env.rank, env.world_size, seed=config.seed)
    if on:
        per_rank = math.ceil(len(train_split.samples) / env.world_size)
        _check_batch(len(train_split.samples), per_rank, config.batch_size, env)
        train_loader, val_loader = build_gpu_loaders(config, train_split, val_split, mean, std, env,
                                                     list(val_order), config.val_batch_size, skipped)
        return train_loader, val_loader, train_loader, f"GPU-resident data ({why})"
    train_ds = ImageDataset(train_split.samples, train_transform(
        config.img_size, mean, std, config.hflip, config.vflip, config.cutout, config.scale,
        config.ratio, config.rotate, config.transpose), skipped)
    val_ds = ImageDataset(val_split.samples, eval_transform(config.img_size, mean, std), skipped)
    # DistributedSampler also in one process: a per-epoch, seed-determined shuffle that a
    # resumed run repeats exactly
    train_sampler = DistributedSampler(train_ds, num_replicas=env.world_size, rank=env.rank,
                                       shuffle=True, seed=config.seed, drop_last=False)
    _check_batch(len(train_ds), len(train_sampler), config.batch_size, env)
    # workers are not persistent: each epoch's workers are seeded from the main RNG, which
    # a checkpoint restores, so a resumed run augments exactly as an unbroken one
    # workers leave Ctrl-C to the main process (utils.interrupt)
    common = dict(num_workers=config.workers, pin_memory=env.device.type == "cuda", worker_init_fn=ignore_sigint)
    train_loader = DataLoader(train_ds, batch_size=config.batch_size, sampler=train_sampler,
                              drop_last=True, **common)
    val_loader = DataLoader(val_ds, batch_size=config.val_batch_size, sampler=val_order, **common)
    return train_loader, val_loader, train_sampler, f"DataLoader ({why})"


def report_loader(config, val_loader, val_split, mean, std, env: DistEnv):
    """Every val image in file order, for the final report (GPU-resident when training was)."""
    if isinstance(val_loader, GpuLoader):
        return full_eval_loader(val_loader)
    return DataLoader(ImageDataset(val_split.samples, eval_transform(config.img_size, mean, std),
                                   val_loader.dataset.skipped),
                      batch_size=config.val_batch_size, num_workers=config.workers,
                      pin_memory=env.device.type == "cuda", worker_init_fn=ignore_sigint)
