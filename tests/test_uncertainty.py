"""The place-level bootstrap of the official score: it agrees with the scorer, resamples places
(not views), and its interval covers the score of places it never saw about as often as it says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geopose_ray.constants import CITIES
from geopose_ray.metrics import GeoposeScore, city_scores, image_sums
from geopose_ray.uncertainty import gap_noise, interval, place_draws


def _places(n_places: int, views: int, seed: int, size: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-tile metric sums of a model whose error is a property of the place (its height bias
    and angle error are the same in every view of it), as a model errs on a building it reads
    wrongly. Returns rows (N, N_FIELDS), city (N,), place (N,)."""
    rng = np.random.default_rng(seed)
    rows, city, place = [], [], []
    for c in CITIES:
        for p in range(n_places):
            height = rng.gamma(2.0, 4.0, (size, size))  # the place's ground truth, m
            bias, angle_err = rng.normal(1.0, 0.35), rng.normal(0.0, 0.6)
            for _ in range(views):
                scale, angle = rng.uniform(0.5, 1.0), rng.uniform(-math.pi, math.pi)
                pred = height * bias + rng.normal(0.0, 0.5, height.shape)
                rows.append(image_sums(height, pred, scale, angle, scale, angle + angle_err))
                city.append(c)
                place.append(f"{c}/{p}")
    return np.array(rows), np.array(city), np.array(place)


def _score(rows: np.ndarray, city: np.ndarray) -> float:
    total = GeoposeScore()
    for r, c in zip(rows, city):
        total.add_image_sums(c, r)
    return total.compute()["final_present"]


def test_city_scores_match_the_official_computation_with_failures_and_empty_cities():
    rows, city, _ = _places(3, 1, seed=0)
    total = GeoposeScore()
    for r, c in zip(rows, city):
        total.add_image_sums(c, r)
    total.mark_failed("OMA")
    sums = total.to_array()
    sums[CITIES.index("JAX")] = 0.0  # no image: NaN, as compute() says
    expected = GeoposeScore(sums).compute()["cities"]
    got = city_scores(sums)
    for i, c in enumerate(CITIES):
        assert got[i] == pytest.approx(expected[c], nan_ok=True)
    assert got[CITIES.index("OMA")] == 0.0 and math.isnan(got[CITIES.index("JAX")])


def test_the_draws_center_on_the_score_and_are_seeded():
    rows, city, place = _places(6, 2, seed=1)
    draws = place_draws(rows, city, place, seed=3)
    assert np.median(draws) == pytest.approx(_score(rows, city), abs=0.1)
    assert np.array_equal(draws, place_draws(rows, city, place, seed=3))


def test_views_of_one_place_do_not_narrow_the_interval():
    """Ten views of each place hold no more places than one view: resampled by place, the
    spread stays; resampled by tile (each view its own place), it would shrink about 3x."""
    rows, city, place = _places(5, 10, seed=2)
    first = np.arange(len(place)) % 10 == 0  # one view of each place
    by_place = interval(rows, city, place)["sd"]
    one_view = interval(rows[first], city[first], place[first])["sd"]
    by_tile = interval(rows, city, np.arange(len(place)).astype(str))["sd"]
    assert by_place == pytest.approx(one_view, rel=0.5)
    assert by_tile < by_place / 2
    assert interval(rows, city, place)["places"] == 20 and interval(rows, city, place)["tiles"] == 200


def test_more_places_narrow_the_interval_and_one_place_is_flagged():
    few = interval(*_places(3, 1, seed=4))
    many = interval(*_places(40, 1, seed=4))
    assert many["sd"] < few["sd"] / 2
    assert interval(*_places(1, 2, seed=4))["min_places"] == 1


def test_the_interval_covers_the_score_of_unseen_places_about_as_often_as_it_says():
    """Calibration of the bootstrap itself: a sample of 6 places per city, its 90 % interval,
    and the score of a large set of other places from the same city model."""
    population = _score(*_places(150, 1, seed=99)[:2])
    covered = 0
    for seed in range(40):
        spread = interval(*_places(6, 2, seed=seed))
        covered += spread["low"] <= population <= spread["high"]
    assert covered >= 0.7 * 40  # 90 % nominal; percentile intervals on 6 places run a little narrow


def test_gap_noise_adds_independent_spreads_and_is_nan_when_one_is_unknown():
    assert gap_noise({"sd": 0.03}, {"sd": 0.04}) == pytest.approx(0.05)
    assert math.isnan(gap_noise(None, {"sd": 0.04}))
