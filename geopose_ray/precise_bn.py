"""BatchNorm statistics of whole training tiles, re-measured after the last epoch.

Training keeps BatchNorm's running statistics as a moving average over the last few batches. On
sparse, tall cities those batches are 2 crops and their half turns, half of them centred on a
building (`data.derive`); the averaged weights (`train_loop.build_ema`) carry statistics of
weights they are not. Validation, checkpoints and inference see whole tiles, through weights the
statistics were never measured with. On a held-out sparse set a model whose D4 test score was
0.05 scored 0.46-0.52 once its statistics were re-measured on all its training tiles, with no
weight changed; on 16 of them it stayed at 0.07 (docs/LEARNING.md, 'BatchNorm statistics of
whole tiles'). So every training tile is measured, once, after the last epoch: the last
checkpoint is validated and saved with them, and one that scores worse than an earlier
checkpoint is not the one a member keeps (`tune.trainer.best_checkpoint`). The idea is
`torch.optim.swa_utils.update_bn` for averaged weights ("precise BN", Wu & Johnson 2021), with
the population's variance rather than the mean of per-batch variances.
Ray-free and torch-only: the train core imports it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from geopose_ray.constants import BN_BATCH, MIN_BN_TILES, bn_tile_count
from geopose_ray.data import stats
from geopose_ray.data.dataset import GeoposeDataset
from geopose_ray.device import autocast


def bn_batches(train: list, val_crop: int, batch_size: int, min_tiles: int = MIN_BN_TILES) -> list[dict[str, Tensor]]:
    """The batches the statistics are measured on, loaded once: whole training tiles (or the
    validation's centre window, `val_crop`, of large ones), spread evenly over the training list
    (it is ordered by city): every one up to BN_PX pixels, at least `min_tiles`. Tiles of one
    size share a batch, so a set of mixed sizes needs no padding."""
    side = val_crop or stats.from_cache(train).tile_px  # a current cache knows every tile's size
    n = bn_tile_count(len(train), side, min_tiles)
    ds = GeoposeDataset([train[i * len(train) // n] for i in range(n)], crop=val_crop or None, random_crop=False)
    by_shape: dict[tuple[int, ...], list[dict[str, Tensor]]] = {}
    for i in range(len(ds)):
        item = ds[i]
        by_shape.setdefault(tuple(item["image"].shape), []).append(item)
    size = max(BN_BATCH, batch_size)
    return [
        {k: torch.stack([it[k] for it in items[j : j + size]]) for k in ("image", "gsd", "city")}
        for items in by_shape.values()
        for j in range(0, len(items), size)
    ]


def freeze_start(epochs: int, share: float) -> int:
    """The first epoch trained with frozen statistics: the last `share` of `epochs`, rounded up
    (at least one epoch when `share` > 0); `epochs` (never) when `share` is 0."""
    return epochs - math.ceil(share * epochs - 1e-9) if share > 0 else epochs


def freeze(model: nn.Module) -> None:
    """Put every BatchNorm of a model in training mode into eval mode: it normalises by its
    running statistics and no longer updates them, while the weights (its affine ones included)
    still learn. Training normalises small crop batches by their own statistics, inference whole
    tiles by the running ones; epochs trained this way let the weights adapt to the latter."""
    for m in _norms(model):
        m.eval()


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute(model: nn.Module, batches: list[dict[str, Tensor]], device: torch.device, precision: str) -> None:
    """Replace `model`'s BatchNorm running statistics by the mean and variance of each norm's
    input over every pixel of `batches` (the norms normalise by batch statistics meanwhile, as in
    training; dropout and the rest stay in eval), then restore every module's mode.

    The variance is the population's, pooled over all batches, not the mean of the batches'
    variances (what `momentum=None` keeps): with a few tiles per batch the latter leaves out the
    differences between batches, and on a sparse city those are most of it. Deterministic: no
    random number is drawn, so a resumed run matches."""
    norms = _norms(model)
    if not norms or not batches:
        return
    sums: dict[nn.Module, list] = {m: [0.0, 0.0, 0] for m in norms}  # sum, sum of squares, count

    def collect(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double().transpose(0, 1).flatten(1)  # (C, N*H*W)
        acc = sums[module]
        acc[0], acc[1], acc[2] = acc[0] + x.sum(1), acc[1] + x.square().sum(1), acc[2] + x.shape[1]

    modes = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(collect) for m in norms]
    model.eval()
    for m in norms:
        m.train()
    try:
        with autocast(device, precision):
            for b in batches:
                model(b["image"].to(device), b["gsd"].to(device), b["city"].to(device))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    for m, (total, squares, n) in sums.items():
        mean = total / n
        var = (squares / n - mean.square()).clamp(min=0) * n / max(1, n - 1)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
