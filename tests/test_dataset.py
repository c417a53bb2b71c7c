"""data.dataset: item shapes and units, crops equal the full tile's slice, per-worker streams."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from geopose_ray.constants import CITIES, city_index
from geopose_ray.data import io
from geopose_ray.data.cache import CachedSample, agl_sums
from geopose_ray.data.dataset import GeoposeDataset, city_means, worker_init_fn

SIZE = 64


def _tiles(root: Path, n: int = 8, split: str = "train", seed: int = 0) -> list[CachedSample]:
    """Cache tiles whose red = row and green = column, so a crop tells where it came from."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    out = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        stem = f"{city}_{split}{i:02d}"
        rgb = np.stack([rows, cols, rng.integers(0, 256, (SIZE, SIZE))], -1).astype(np.uint8)
        io.write_rgb_tiled(root / f"{stem}_RGB.tif", rgb)
        agl = None
        if split == "train":
            cm = rng.integers(0, 4000, (SIZE, SIZE)).astype(np.uint16)
            cm[rng.random((SIZE, SIZE)) < 0.1] = 65535
            agl = root / f"{stem}_AGL.tif"
            io.write_agl_tiled(agl, cm)
        scale, angle = (float(rng.uniform(0.6, 1.1)), float(rng.uniform(-3, 3))) if agl else (math.nan,) * 2
        sums = agl_sums(agl) if agl else {}  # what conversion stores in samples.csv
        rgb_path = root / f"{stem}_RGB.tif"
        out.append(CachedSample(f"{split}{i:02d}", city, 0.3 + 0.01 * i, split, rgb_path, agl, scale, angle, **sums))
    return out


@pytest.fixture
def train(tmp_path) -> list[CachedSample]:
    return _tiles(tmp_path)


def _offsets(item: dict) -> tuple[int, int]:
    """(row, col) of the crop's top-left pixel, read back from the red/green channels."""
    return round(float(item["image"][0, 0, 0]) * 255), round(float(item["image"][1, 0, 0]) * 255)


def test_item_shapes_dtypes_and_units(train):
    item = GeoposeDataset(train, crop=32)[1]
    s = train[1]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    assert item["agl"].shape == item["mag"].shape == (1, 32, 32) and item["agl"].dtype == torch.float32
    assert item["agl"].isnan().any() and not item["agl"].isnan().all()
    torch.testing.assert_close(item["mag"], item["agl"] * s.scale, equal_nan=True)
    assert item["scale"].shape == () and item["scale"].item() == pytest.approx(s.scale)
    torch.testing.assert_close(item["direction"], torch.tensor([math.sin(s.angle), math.cos(s.angle)]))
    assert item["gsd"].dtype == torch.float32 and item["gsd"].item() == pytest.approx(s.gsd)
    assert item["city"].dtype == torch.int64 and item["city"].item() == city_index(s.city)
    assert item["id"] == s.id


def test_random_crop_equals_the_full_tiles_slice(train):
    dataset = GeoposeDataset(train, crop=24, seed=5)
    seen = set()
    for i in range(12):
        item, s = dataset[i % len(train)], train[i % len(train)]
        r, c = _offsets(item)
        seen.add((r, c))
        full_rgb, full_agl = io.read_rgb(s.rgb), io.read_agl(s.agl)
        expected = torch.from_numpy(full_rgb[r : r + 24, c : c + 24]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(item["image"], expected)
        torch.testing.assert_close(
            item["agl"][0], torch.from_numpy(full_agl[r : r + 24, c : c + 24]), equal_nan=True
        )
    assert len(seen) > 6  # the crops move


@pytest.mark.parametrize("crop", [None, SIZE, 4 * SIZE])
def test_no_crop_or_a_large_crop_gives_the_full_tile(train, crop):
    item = GeoposeDataset(train, crop=crop)[0]
    assert item["image"].shape == (3, SIZE, SIZE) and _offsets(item) == (0, 0)
    torch.testing.assert_close(item["agl"][0], torch.from_numpy(io.read_agl(train[0].agl)), equal_nan=True)


def test_centre_crop_is_fixed(train):
    dataset = GeoposeDataset(train, crop=32, random_crop=False)
    assert {_offsets(dataset[0]) for _ in range(3)} == {(16, 16)}


def test_same_seed_same_crops(train):
    a, b = GeoposeDataset(train, crop=16, seed=1), GeoposeDataset(train, crop=16, seed=1)
    assert [_offsets(a[i]) for i in range(8)] == [_offsets(b[i]) for i in range(8)]


def test_transform_output_is_used_and_mag_follows_it(train):
    calls = []

    def transform(image, agl, vflow):
        calls.append((image.dtype, image.shape, agl.dtype, vflow.copy()))
        return {"image": image[:, ::-1], "agl": agl[:, ::-1], "vflow": vflow * [1.0, 2.0, 1.0]}

    s = train[2]
    item = GeoposeDataset(train, crop=None, transform=transform)[2]
    assert calls[0][:3] == (np.uint8, (SIZE, SIZE, 3), np.float32)
    np.testing.assert_allclose(calls[0][3], [s.angle, s.scale, s.gsd])
    flipped = io.read_agl(s.agl)[:, ::-1].copy()
    torch.testing.assert_close(item["agl"][0], torch.from_numpy(flipped), equal_nan=True)
    torch.testing.assert_close(item["mag"][0], torch.from_numpy(flipped) * 2 * s.scale, equal_nan=True)
    assert item["scale"].item() == pytest.approx(2 * s.scale)
    assert _offsets(item) == (0, SIZE - 1)


def test_test_tiles_have_nan_targets(tmp_path):
    item = GeoposeDataset(_tiles(tmp_path, 2, split="test"), crop=32)[0]
    assert item["image"].shape == (3, 32, 32)
    assert item["agl"].shape == (1, 32, 32) and item["agl"].isnan().all() and item["mag"].isnan().all()
    assert item["scale"].isnan() and item["direction"].isnan().all()


def test_repeat_cycles_the_samples(train):
    dataset = GeoposeDataset(train, crop=16, repeat=3)
    assert len(dataset) == 3 * len(train)
    assert [dataset[i]["id"] for i in range(len(dataset))] == [s.id for s in train] * 3


def _worker_crops(dataset: GeoposeDataset, init) -> tuple[list, list]:
    """Crops drawn by worker 0 and worker 1 (batches alternate between the two workers)."""
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=init)
    crops = [_offsets({"image": batch["image"][0]}) for batch in loader]
    return crops[0::2], crops[1::2]


def test_dataloader_workers_draw_different_crops(train):
    dataset = GeoposeDataset(train[:1], crop=16, repeat=16)
    first, second = _worker_crops(dataset, worker_init_fn)
    assert first != second
    assert _worker_crops(dataset, worker_init_fn) == (first, second)  # reproducible under manual_seed
    # the bug the hook prevents: forked workers without it repeat one another's stream
    same_a, same_b = _worker_crops(dataset, None)
    assert same_a == same_b


def test_city_means_match_the_pixels(train):
    means = city_means(train)
    assert set(means) == {s.city for s in train}
    for city, (mean_agl, mean_mag) in means.items():
        tiles = [s for s in train if s.city == city]
        agl = np.concatenate([io.read_agl(s.agl).ravel() for s in tiles]).astype(np.float64)
        mag = np.concatenate([io.read_agl(s.agl).ravel() * s.scale for s in tiles]).astype(np.float64)
        assert mean_agl == pytest.approx(np.nanmean(agl), rel=1e-6)
        assert mean_mag == pytest.approx(np.nanmean(mag), rel=1e-6)


def test_epoch_samples_fix_the_epoch_length_whatever_the_tile_count(train):
    """`length` cycles the samples: an epoch is a number of crops, not a number of tiles."""
    from geopose_ray.data.dataset import GeoposeDataset

    ds = GeoposeDataset(train[:3], crop=32, length=10)
    assert len(ds) == 10
    assert ds[7]["id"] == train[7 % 3].id


def test_target_units_are_the_rms_of_the_valid_targets(train):
    """(AGL m, MAG px) RMS over the valid pixels: what the model's dense heads output in."""
    import math

    import numpy as np

    from geopose_ray.data import io
    from geopose_ray.data.dataset import target_units

    agl_sq = mag_sq = count = 0.0
    for s in train:
        a = io.read_agl(s.agl).astype(np.float64)
        a = a[np.isfinite(a)]
        agl_sq, mag_sq, count = agl_sq + (a**2).sum(), mag_sq + ((a * s.scale) ** 2).sum(), count + a.size
    agl, mag = target_units(train)
    assert agl == pytest.approx(math.sqrt(agl_sq / count)) and mag == pytest.approx(math.sqrt(mag_sq / count))


def test_target_means_and_units_come_from_the_conversion_sums_without_reading_tiles(train, tmp_path):
    """samples.csv holds each tile's AGL sums: a fold's means and units are sums of them, so no
    trial reads the training set; with the sums gone (an older cache) the tiles are read."""
    import dataclasses

    from geopose_ray.data.dataset import target_units

    assert all(s.agl_n > 0 for s in train)
    gone = [dataclasses.replace(s, agl=tmp_path / "missing.tif") for s in train]  # any read would fail
    assert city_means(gone) == city_means(train) and target_units(gone) == target_units(train)
    old = [dataclasses.replace(s, agl_n=0, agl_sum=float("nan"), agl_sq=float("nan")) for s in train]
    assert target_units(old) == pytest.approx(target_units(train))
    for city, means in city_means(train[:2]).items():  # any subset (a fold's split): its own sums
        assert city_means(old[:2])[city] == pytest.approx(means)


def test_half_turn_pairs_are_the_crops_turned_180_degrees_with_their_flow(train):
    """The second half of a half-turn batch is the first half rotated by 180 degrees, with the
    direction the geo warp rules give for that rotation (`functional.update_vflow`)."""
    from geopose_ray.data import functional as F
    from geopose_ray.data.dataset import half_turn_collate

    dataset = GeoposeDataset(train, crop=32, seed=1)
    items = [dataset[i] for i in range(3)]
    batch = half_turn_collate(items)
    assert batch["image"].shape == (6, 3, 32, 32) and batch["id"] == [it["id"] for it in items] * 2
    for i, item in enumerate(items):
        turned = {k: batch[k][3 + i] for k in ("image", "agl", "mag", "direction", "scale", "gsd", "city")}
        want_img = np.rot90(item["image"].numpy(), 2, axes=(1, 2))
        np.testing.assert_array_equal(turned["image"].numpy(), want_img)
        np.testing.assert_array_equal(turned["agl"].numpy(), np.rot90(item["agl"].numpy(), 2, axes=(1, 2)))
        np.testing.assert_array_equal(turned["mag"].numpy(), np.rot90(item["mag"].numpy(), 2, axes=(1, 2)))
        angle = math.atan2(*item["direction"].tolist())
        new = F.update_vflow(np.array([angle, 1.0, 1.0]), F.rot90_matrix(2))
        torch.testing.assert_close(turned["direction"], torch.tensor(F.direction(new[0]), dtype=torch.float32))
        for key in ("scale", "gsd", "city"):
            assert turned[key] == item[key]
    assert torch.allclose(batch["direction"].sum(0), torch.zeros(2), atol=1e-6)  # a batch's directions cancel
    assert batch["half_turned"] is True  # what tells the losses that crops i and i + 3 are one crop


@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_half_turn_loaders_keep_the_images_per_step_and_per_epoch(tmp_path, batch_size):
    """With half turns a step holds 2 * ceil(B / 2) images and an epoch the same number of
    images as without (half as many distinct crops), so budgets compare at equal pixels."""
    from geopose_ray.config import Config
    from geopose_ray.data.loaders import build_loaders

    train = _tiles(tmp_path, n=8)
    seen = {}
    for turns in (False, True):
        cfg = Config.from_dict({"crop": 32, "batch_size": batch_size, "epoch_samples": 20, "half_turns": turns})
        loader, _ = build_loaders(cfg, train, train[:1])
        sizes = [b["image"].shape[0] for b in loader]
        seen[turns] = sum(sizes)
        if turns:
            assert set(sizes[:-1]) == {2 * -(-batch_size // 2)}
    assert abs(seen[True] - seen[False]) <= 2 * batch_size


def _one_tower_tile(root: Path, tower_cm: int = 3000) -> CachedSample:
    """A 64 px tile, flat but for a 4 x 4 px tower (30 m) at rows and columns 50-53."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    io.write_rgb_tiled(root / "JAX_t_RGB.tif", np.stack([rows, cols, cols], -1).astype(np.uint8))
    cm = np.zeros((SIZE, SIZE), np.uint16)
    cm[50:54, 50:54] = tower_cm
    io.write_agl_tiled(root / "JAX_t_AGL.tif", cm)
    agl = root / "JAX_t_AGL.tif"
    return CachedSample("t", "JAX", 0.3, "train", root / "JAX_t_RGB.tif", agl, 1.0, 0.5, **agl_sums(agl))


@pytest.mark.parametrize("foreground, low, high", [(0.0, 0.0, 0.2), (0.5, 0.4, 0.7), (1.0, 1.0, 1.0)])
def test_foreground_crops_show_a_building_in_their_share_of_crops(tmp_path, foreground, low, high):
    """A 16 px crop of the tile holds the tower in ~9 % of uniform draws; with `foreground` f at
    least f of the crops hold it, and the crop stays inside the tile."""
    dataset = GeoposeDataset([_one_tower_tile(tmp_path)], crop=16, seed=3, foreground=foreground)
    items = [dataset[0] for _ in range(200)]
    share = np.mean([bool((item["agl"] > 2).any()) for item in items])
    assert low <= share <= high
    assert all(item["image"].shape == (3, 16, 16) for item in items)


def test_foreground_crops_are_uniform_on_a_tile_with_no_building(tmp_path):
    flat = GeoposeDataset([_one_tower_tile(tmp_path, tower_cm=100)], crop=24, seed=5, foreground=1.0)
    assert len({_offsets(flat[0]) for _ in range(12)}) > 6
