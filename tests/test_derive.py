"""Defaults derived from the data: the crop holds the measured roof displacement, a step and an
epoch cost the same pixels whatever the crop, large tiles are validated in windows, and a key the
space sets wins. The default space leaves them unset, so the default path derives them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from geopose_ray.data import derive, stats
from geopose_ray.data.stats import DataStats

ROOT = Path(__file__).resolve().parents[1]
DERIVED = ("crop", "batch_size", "epoch_samples", "foreground_crops", "dir_weight", "val_crop", "val_batch_size")


def _stats(tile: int, disp: float, built: float = 0.1, mag_rms: float = 5.0) -> DataStats:
    return DataStats(48, 48, tile_px=tile, disp_p95=disp, disp_max=disp, built=built, mag_rms=mag_rms)


def _values(s: DataStats, given: dict | None = None) -> dict:
    return {d.key: d.value for d in derive.derive(s, given)}


@pytest.mark.parametrize(
    ("tile", "disp"), [(128, 13.0), (256, 5.0), (256, 40.0), (256, 85.0), (512, 60.0), (2048, 400.0)]
)
def test_the_crop_holds_the_displacement_and_a_step_costs_the_same_pixels(tile, disp):
    v = _values(_stats(tile, disp))
    assert v["crop"] % derive.CROP_STEP == 0 and derive.MIN_CROP <= v["crop"] <= min(tile, derive.MAX_CROP)
    assert v["crop"] >= min(derive.CROP_PER_DISPLACEMENT * disp, tile, derive.MAX_CROP)
    step_px = v["batch_size"] * v["crop"] ** 2
    assert step_px == pytest.approx(derive.STEP_PX, rel=0.5) or v["batch_size"] == derive.MIN_BATCH
    assert v["epoch_samples"] % v["batch_size"] == 0 and v["epoch_samples"] * v["crop"] ** 2 >= 0.5 * derive.EPOCH_PX
    assert (v["val_crop"] == 0) == (tile <= derive.FULL_TILE_VAL)
    assert v["val_crop"] <= tile and v["val_batch_size"] >= 1


def test_taller_buildings_get_larger_crops():
    crops = [_values(_stats(256, d))["crop"] for d in (5, 20, 40, 60, 90, 130)]
    assert crops == sorted(crops) and crops[0] == 64 and crops[-1] == 256


@pytest.mark.parametrize(("built", "centred"), [(0.05, True), (0.13, True), (0.26, False), (0.45, False)])
def test_sparse_cities_get_crops_centred_on_buildings(built, centred):
    v = _values(_stats(256, 40.0, built))
    assert (v["foreground_crops"] > 0) == centred and 0 <= v["foreground_crops"] < 1


def test_the_direction_weight_grows_with_the_square_of_the_lean():
    """The MAG loss is in px², the direction loss O(1): twice the lean, four times the weight."""
    weights = [_values(_stats(256, 40.0, mag_rms=m))["dir_weight"] for m in (0.5, 2.5, 5.0, 10.0, 100.0)]
    assert weights[0] == derive.MIN_DIR_WEIGHT and weights[-1] == derive.MAX_DIR_WEIGHT
    assert weights[1] == pytest.approx(1.0, abs=0.1) and weights[3] == pytest.approx(4 * weights[2], rel=0.05)


def test_a_key_the_space_sets_wins_and_the_keys_after_it_follow_it():
    s = _stats(256, 85.0)
    fixed, lines = derive.apply({"crop": 64}, ["batch_size"], derive.derive(s, {"crop": 64}))
    assert fixed["crop"] == 64 and "batch_size" not in fixed  # searched: the space's choice
    assert fixed["epoch_samples"] == 0  # the space set its crop, so its budget: a pass over the tiles
    assert any(line.startswith("crop") and "set by the space" in line for line in lines)
    assert any(line.startswith("batch_size") and "searched" in line for line in lines)
    assert len(lines) == len(DERIVED)


def test_the_default_space_leaves_every_derived_key_to_the_data():
    doc = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    assert not set(DERIVED) & (set(doc.get("fixed", {})) | set(doc.get("parameters", {})))


def test_stats_from_files_and_from_the_cache_agree(synthetic_dir, synthetic_cache):
    from geopose_ray.data import cache

    cached = stats.from_cache(cache.load_cache(synthetic_cache, "train"))
    sampled = stats.from_files(synthetic_dir, max_tiles=1000)
    assert cached.train_tiles == sampled.train_tiles == sampled.measured == 12
    assert cached.tile_px == sampled.tile_px == 64
    assert cached.disp_p95 == pytest.approx(sampled.disp_p95, rel=1e-3)
    assert cached.disp_p95 > 0 and 0 < cached.built < 1
    assert cached.mag_rms == pytest.approx(sampled.mag_rms, rel=1e-3) and cached.mag_rms > 0


def test_agl_stats_measure_the_lean_of_built_pixels_only():
    agl = np.zeros((100, 100), np.float32)
    agl[:10, :10] = 30.0  # 1 % of the tile is a 30 m building
    agl[50, 50] = np.nan
    row = stats.agl_stats(agl, scale=2.0)
    assert row["disp_p95"] == pytest.approx(60.0) and row["built"] == pytest.approx(100 / 9999)
    assert row["agl_n"] == 9999 and (row["height"], row["width"]) == (100, 100)
    assert stats.agl_stats(np.zeros((8, 8), np.float32), 1.0)["disp_p95"] == 0.0


@pytest.mark.parametrize(
    ("crop", "samples", "expected", "grace"),
    [(64, 320, 20, 5), (96, 142, 45, 11), (128, 80, 80, 20), (160, 52, 120, 30), (256, 20, 120, 30), (160, 0, 20, 5)],
)
def test_larger_crops_train_longer_within_a_bound(crop, samples, expected, grace):
    """An epoch of larger crops shows fewer roofs: trials and refits see as many crops, within 6x,
    and ASHA's rungs move alike; a space whose epoch is a pass over the tiles keeps its budget."""
    budget, got_grace = derive.trial_epochs(20, 5, crop, samples)
    assert (budget.value, got_grace) == (expected, grace)


def test_the_search_trains_the_delivered_budget_and_refits_reuse_it(tmp_path):
    """On tall data the trials' budget is the delivered one: the refits train it (no longer
    epochs of their own) and the search's full-budget trials are members; --max-epochs and
    --refit-epochs are taken as given."""
    from geopose_ray.tune.options import SearchOptions, resolve_space
    from geopose_ray.tune.refit_plan import refit_epochs
    from geopose_ray.tune.space import load_space

    base = load_space(ROOT / "search_spaces" / "smoke.yaml")
    tall, lines = base.with_data(_stats(256, 65.0))
    gentle = base.with_data(_stats(128, 13.0))[0]
    assert (tall.scheduler.max_epochs, tall.scheduler.grace_period) == (120, 30)  # 160 px crops: (160/64)² > 6
    assert any(line.startswith("max_epochs") and "120" in line for line in lines)
    assert gentle.scheduler == base.scheduler  # 64 px crops: the space's own budget
    opts = SearchOptions(space=str(base.path))
    assert refit_epochs(opts) == (None, "the trials' budget")
    assert refit_epochs(SearchOptions(space=str(base.path), refit_epochs=7)) == (7, "--refit-epochs")
    given = resolve_space(SearchOptions(space=str(base.path), max_epochs=8), str(tmp_path), _stats(256, 65.0))
    assert (given.scheduler.max_epochs, given.scheduler.grace_period) == (8, 5)
    assert resolve_space(opts, str(tmp_path), _stats(256, 65.0)).scheduler.max_epochs == 120
