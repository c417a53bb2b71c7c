"""From a Config to DataLoaders: the cache, the fold split and the loaders of one run.

The fold split depends on the config alone (`folds.config_folds`: `fold_seed`, `n_folds`,
`fold_mode`, never the training seed), the same function the ensemble's out-of-fold step calls,
so every trial, refit and blend agrees on which tiles a member never saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from geopose_ray import paths
from geopose_ray.config import Config
from geopose_ray.data import cache, folds
from geopose_ray.data.dataset import GeoposeDataset, half_turn_collate, worker_init_fn
from geopose_ray.data.transforms import build_train_transform_from_config
from geopose_ray.errors import InputError


def cache_of(cfg: Config) -> Path:
    """The conversion cache of `cfg.data`; InputError when it is not current. A run never
    converts: its driver ensured the cache before (`geopose_ray.convert.ensure_cache`)."""
    d = cfg.data
    data_dir = Path(d.data_dir) if d.data_dir else paths.default_data_dir()
    return cache.require_current(data_dir, d.cache_dir or None)


def split_samples(cfg: Config) -> tuple[list[cache.CachedSample], list[cache.CachedSample]]:
    """(train, val) cached samples: val = fold `cfg.data.fold`, optionally truncated.

    Folds come from the config alone (`folds.config_folds`), as in the ensemble's out-of-fold
    step, so every trial, refit and blend agrees.
    """
    d = cfg.data
    cache_dir = cache_of(cfg)
    samples = cache.load_cache(cache_dir, "train")
    try:
        assignment = folds.config_folds(samples, d)
    except ValueError as e:  # n_folds larger than the data set or its places, unknown fold_mode
        raise InputError(cache_dir / cache.SAMPLES_CSV, str(e)) from None
    train = [s for s in samples if assignment[s.id] != d.fold]
    val = [s for s in samples if assignment[s.id] == d.fold]
    train = train[: d.max_train_samples] if d.max_train_samples else train
    val = val[: d.max_val_samples] if d.max_val_samples else val
    if not train or not val:
        problem = f"fold {d.fold} of {d.n_folds} leaves {len(train)} train / {len(val)} val tiles"
        raise InputError(cache_dir / cache.SAMPLES_CSV, problem)
    return train, val


def build_loaders(
    cfg: Config, train: list, val: list, rank: int = 0, world_size: int = 1
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Training loader (random crops + augmentation, shuffled; the caller may wrap it with a
    DistributedSampler) and this rank's validation loader over its own shard `val[rank::world]`,
    unpadded, so that summing over ranks counts every tile exactly once."""
    d, seed = cfg.data, cfg.train.seed
    # half turns: half the crops, each seen twice, so a step and an epoch hold the same pixels
    views = 2 if d.half_turns else 1
    batch_size = -(-d.batch_size // views)  # ceil
    train_ds = GeoposeDataset(
        train,
        crop=d.crop,
        transform=build_train_transform_from_config(d),
        repeat=d.repeat,
        seed=seed + rank,
        length=-(-d.epoch_samples // views),
        foreground=d.foreground_crops,
    )
    val_ds = GeoposeDataset(val[rank::world_size], crop=d.val_crop or None, random_crop=False, seed=seed)
    common = {
        "num_workers": d.loader_workers,
        "worker_init_fn": worker_init_fn,
        "pin_memory": torch.cuda.is_available(),
    }
    train_dl = torch.utils.data.DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_ds) >= batch_size * world_size,  # no 1-image batch for BatchNorm
        collate_fn=half_turn_collate if d.half_turns else None,
        persistent_workers=d.loader_workers > 0,
        **common,
    )
    # its own generator: a loader's iterator draws its workers' base seed from it, and from the
    # global RNG without one, which would move the next epoch's shuffle whenever a validation ran
    # (so `val_every` would change the weights trained)
    val_gen = torch.Generator().manual_seed(seed)
    val_dl = torch.utils.data.DataLoader(
        val_ds, batch_size=d.val_batch_size, shuffle=False, generator=val_gen, **common
    )
    return train_dl, val_dl


def start_epoch(loader: Any, seed: int, rank: int, epoch: int) -> None:
    """Per-epoch shuffling and crop/augmentation streams that depend only on (seed, rank, epoch),
    so a resumed run draws what an uninterrupted one would (DataLoader workers reseed
    themselves from the torch RNG instead, see `worker_init_fn`)."""
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)  # DistributedSampler
    if hasattr(loader.dataset, "reseed"):
        loader.dataset.reseed(int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0]))
