"""BatchNorm statistics re-measured on whole training tiles: they equal the mean and the pooled
variance of every pixel of the tiles whatever the moving average held, nothing but the norms changes mode,
and no random number is drawn (a resumed run must match an uninterrupted one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geopose_ray import precise_bn
from geopose_ray.constants import MIN_RUNG_BN_TILES, bn_tile_count
from geopose_ray.data import cache


class _Tiny(nn.Module):
    """conv -> BN -> dropout, called like the product's models; records the dropout's mode."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5)
        self.dropout_modes: list[bool] = []

    def forward(self, x, gsd, city):
        self.dropout_modes.append(self.drop.training)
        return {"agl": self.drop(self.bn(self.conv(x)))}


def _batches(n: int = 3, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(2, 3, size, size, generator=g) + 2.0 * i,  # batches far apart
            "gsd": torch.ones(2),
            "city": torch.zeros(2, dtype=torch.int64),
        }
        for i in range(n)
    ]


def test_statistics_are_those_of_every_pixel_of_the_tiles_whatever_the_moving_average_held():
    """Pooled over the batches: batches that differ (a sparse city's tiles) add their differences
    to the variance, which the mean of per-batch variances would leave out."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Tiny().eval()
    with torch.no_grad():
        model.conv.weight.abs_()  # every channel sees the batches' offsets, whatever the draw
    model.bn.running_mean.fill_(100.0)
    model.bn.running_var.fill_(1e-3)  # a moving average of unlike batches
    batches = _batches()
    with torch.no_grad():
        feats = [model.conv(b["image"]) for b in batches]
    rng = torch.get_rng_state()
    precise_bn.recompute(model, batches, torch.device("cpu"), "fp32")
    pooled = torch.cat([f.transpose(0, 1).flatten(1) for f in feats], dim=1)  # (C, every pixel)
    expected_mean, expected_var = pooled.mean(1), pooled.var(1, unbiased=True)
    mean_of_batch_vars = torch.stack([f.var(dim=(0, 2, 3)) for f in feats]).mean(0)
    assert (expected_var > 1.2 * mean_of_batch_vars).all()  # the batches differ: the test can tell
    assert torch.allclose(model.bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(model.bn.running_var, expected_var, rtol=1e-4)
    assert torch.equal(torch.get_rng_state(), rng)  # no random number drawn
    assert not model.training and not model.bn.training and model.bn.momentum == 0.1  # restored
    assert model.dropout_modes == [False] * len(batches)  # only the norms measured in train mode
    with torch.no_grad():
        out = model(batches[0]["image"], None, None)["agl"]  # now normalised: no longer ~ -100 / 0.03
    assert out.abs().mean() < 5.0


def test_the_measured_tiles_span_the_training_list_and_group_by_size(synthetic_cache):
    train = cache.load_cache(synthetic_cache, "train")  # 12 tiles of 64 px, 3 per city
    batches = precise_bn.bn_batches(train, val_crop=0, batch_size=4)
    assert sum(len(b["city"]) for b in batches) == len(train)  # fewer than MIN_BN_TILES: every one
    assert {tuple(b["image"].shape[1:]) for b in batches} == {(3, 64, 64)}
    assert len(torch.cat([b["city"] for b in batches]).unique()) == len({s.city for s in train})  # every city
    windows = precise_bn.bn_batches(train, val_crop=32, batch_size=4)
    assert {tuple(b["image"].shape[1:]) for b in windows} == {(3, 32, 32)}  # the validation's centre window


def test_frozen_norms_normalise_by_their_statistics_and_keep_them_while_the_weights_learn():
    """What the last `bn_freeze` share of the epochs trains with: the running statistics used
    (a batch far from them is not re-centred) and left unchanged, the affine weights still updated,
    the other modules still in training mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Tiny().train()
    with torch.no_grad():
        model.conv.weight.abs_()  # every channel sees the batch's offset
    precise_bn.freeze(model)
    assert model.training and model.drop.training and not model.bn.training
    before = model.bn.running_mean.clone(), model.bn.running_var.clone(), model.bn.weight.detach().clone()
    x = _batches()[2]["image"]  # pixels near 4: a batch's own statistics would centre them
    out = model.bn(model.conv(x))
    assert out.mean().abs() > 1.0  # normalised by running statistics (0, 1), not the batch's
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    out.square().mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.equal(model.bn.running_mean, before[0]) and torch.equal(model.bn.running_var, before[1])
    assert not torch.equal(model.bn.weight.detach(), before[2])


def test_the_frozen_epochs_are_the_last_share_rounded_up():
    assert precise_bn.freeze_start(20, 0.0) == 20  # off: no epoch frozen
    assert precise_bn.freeze_start(20, 0.2) == 16
    assert precise_bn.freeze_start(50, 0.2) == 40
    assert precise_bn.freeze_start(3, 0.1) == 2  # a share above 0 freezes at least one epoch
    assert precise_bn.freeze_start(5, 1.0) == 0


@pytest.mark.parametrize(
    ("train_tiles", "side", "final", "rung"),
    [(320, 384, 64, 32), (320, 512, 64, 32), (240, 128, 240, 240), (48, 256, 48, 48), (20, 384, 20, 20)],
)
def test_a_rung_reads_fewer_large_tiles_than_the_last_epoch(train_tiles, side, final, rung):
    """Small tiles: the pixel budget decides both counts. Large ones: the floor does, and a rung,
    which only ranks trials, has the lower one. Never more tiles than there are."""
    assert bn_tile_count(train_tiles, side) == final
    assert bn_tile_count(train_tiles, side, MIN_RUNG_BN_TILES) == rung
