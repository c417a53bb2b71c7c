"""Finding places (`data.places`) on small synthetic sets whose places (the `group` column) are
known but hidden from the matcher: pair precision and recall, no joins between distinct places,
independence of the tiles' order, and tiles without buildings or without any AGL."""

from __future__ import annotations

import functools
import inspect
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from geopose_ray.data import io, layout, places
from geopose_ray.synthetic import generate

GOAL = 0.95


def _tiles(data_dir: Path) -> tuple[list[places.PlaceTile], dict[str, str]]:
    """Train tiles as the conversion step would pass them (files read lazily), and the truth."""
    tiles, truth = [], {}
    for s in layout.load_split(data_dir, "train"):
        vflow = io.read_vflow(s.vflow)
        agl, rgb = functools.partial(io.read_agl, s.agl), functools.partial(io.read_rgb, s.rgb)
        tiles.append(places.PlaceTile(s.id, s.city, vflow.scale, vflow.angle, agl, rgb, s.gsd))
        truth[s.id] = f"{s.city}/{s.group}"
    return tiles, truth


@pytest.fixture(scope="module")
def pairs_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[places.PlaceTile], dict[str, str]]:
    """The default generator (2 views per place) at 96 px, 12 train tiles per city."""
    out = generate(tmp_path_factory.mktemp("places") / "s96", size=96, per_city=12, test_per_city=0)
    return _tiles(out)


def test_finds_the_places_of_view_pairs(pairs_set):
    tiles, truth = pairs_set
    found = places.find_places(tiles)
    assert set(found) == set(truth)
    precision, recall = places.pair_precision_recall(found, truth)
    assert precision >= GOAL and recall >= GOAL, (precision, recall)
    assert all(name.startswith(f"{truth[i].split('/')[0]}/p") for i, name in found.items())


def test_finds_places_of_many_views_with_own_gsd(tmp_path):
    """More views per place, each with its own GSD (when the generator offers them)."""
    wanted = {"views": 4, "gsd_jitter": 0.05}
    if not set(wanted) <= set(inspect.signature(generate).parameters):
        pytest.skip("the synthetic generator has no per-view parameters")
    out = generate(tmp_path / "v4", size=96, per_city=12, test_per_city=0, **wanted)
    tiles, truth = _tiles(out)
    precision, recall = places.pair_precision_recall(places.find_places(tiles), truth)
    assert precision >= GOAL and recall >= GOAL, (precision, recall)


def test_distinct_places_are_never_joined(pairs_set):
    tiles, truth = pairs_set
    one_view = list({truth[t.id]: t for t in tiles}.values())  # one tile per place
    found = places.find_places(one_view)
    assert len(set(found.values())) == len(one_view)


def test_result_does_not_depend_on_tile_order(pairs_set):
    tiles, _ = pairs_set
    descriptors = [places.describe(t) for t in tiles]
    shuffled = descriptors[:]
    random.Random(3).shuffle(shuffled)
    assert places.group_descriptors(shuffled) == places.group_descriptors(descriptors)


def test_flat_and_empty_tiles_do_not_crash(pairs_set):
    """A place without buildings (AGL all 0) is still matched on its ground grey; a tile without
    any AGL (all NaN) or without RGB is described and stays a place of its own."""
    tiles, truth = pairs_set
    first = [t for t in tiles if truth[t.id] == truth[tiles[0].id]]
    assert len(first) == 2
    flat = [replace(t, agl=np.zeros_like(t.agl())) for t in first]
    blank = replace(tiles[2], id="nan000", agl=np.full((96, 96), np.nan, np.float32))
    no_rgb = replace(tiles[3], id="norgb0", rgb=None)
    found = places.find_places([*flat, blank, no_rgb, *tiles[4:8]])
    assert found[flat[0].id] == found[flat[1].id]
    assert sum(p == found["nan000"] for p in found.values()) == 1
    d = places.describe(blank)
    assert np.isfinite(d.height).all() and np.isfinite(d.grey).all()
    assert places.find_places([blank]) == {"nan000": f"{blank.city}/p0000"}


def test_pair_precision_recall_counts_pairs():
    truth = {"a": "x", "b": "x", "c": "x", "d": "y"}
    assert places.pair_precision_recall(truth, truth) == (1.0, 1.0)
    split = {"a": "1", "b": "1", "c": "2", "d": "3"}  # 1 of 3 true pairs joined, no false one
    assert places.pair_precision_recall(split, truth) == pytest.approx((1.0, 1 / 3))
    merged = dict.fromkeys(truth, "1")  # 6 pairs joined, 3 true
    assert places.pair_precision_recall(merged, truth) == pytest.approx((0.5, 1.0))
