"""How far a score measured on few places can move: a place-level bootstrap of the official score.

The official score is a mean over cities of per-city R² values, each computed from the pooled
pixels of that city's tiles. With 2-5 places per city in a fold, which places happened to land
there moves a city's R² by tenths, so an out-of-fold score can miss the test score by more than
any model difference (docs/LEARNING.md, 'How far a score can be trusted'). Resampling places (not
tiles: the views of one place err together) within each city, as the folds and the test draw
them, gives the spread that a figure printed beside a test score should carry. No `ray` import.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from geopose_ray.metrics import city_scores

DRAWS = 2000  # resampled sets; the 5 % and 95 % quantiles move by < 0.005 between seeds at this count
LEVEL = 0.9  # the printed interval: 5th to 95th percentile of the draws


def place_draws(
    rows: np.ndarray, city: np.ndarray, place: np.ndarray, draws: int = DRAWS, seed: int = 0
) -> np.ndarray:
    """(draws,) official scores (mean over the cities present) of resampled sets of tiles: in
    each city, as many places as it has, drawn with replacement, each with all its tiles.

    rows (N, N_FIELDS) per-tile metric sums (`metrics.image_sums`); city (N,) any labels; place
    (N,) any labels (a tile's own id where places are unknown, e.g. test tiles). The draws
    are widened about the point score by sqrt(n / (n - 1)) per city of n places."""
    rng = np.random.default_rng(seed)
    rows, city, place = np.asarray(rows, dtype=np.float64), np.asarray(city), np.asarray(place)
    per_city = []
    for c in np.unique(city):
        mine = city == c
        keys, inverse = np.unique(place[mine], return_inverse=True)
        place_sums = np.zeros((len(keys), rows.shape[1]))  # (P, N_FIELDS)
        np.add.at(place_sums, inverse, rows[mine])
        n = len(keys)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=draws)  # (D, P)
        drawn, point = city_scores(counts @ place_sums), city_scores(place_sums.sum(axis=0))  # (D,), ()
        # a bootstrap of n units spreads (n - 1) / n of the sampling variance: widen it back, which
        # matters at the 2-3 places per city of a small fold (one place: no spread is known)
        per_city.append(point + (drawn - point) * math.sqrt(n / (n - 1)) if n > 1 else drawn)
    if not per_city:
        return np.full(draws, math.nan)
    return np.mean(per_city, axis=0)


def interval(
    rows: np.ndarray, city: np.ndarray, place: np.ndarray, level: float = LEVEL, seed: int = 0
) -> dict[str, Any]:
    """The bootstrap's summary: `sd`, the central `level` interval (`low`, `high`), and the
    `places` and `tiles` behind it (a city with one place contributes no spread: the figure is
    then a lower bound, which `min_places` shows)."""
    draws = place_draws(rows, city, place, seed=seed)
    place, city = np.asarray(place), np.asarray(city)
    per_city = [len(np.unique(place[city == c])) for c in np.unique(city)]
    finite = draws[np.isfinite(draws)]
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2]) if finite.size else (math.nan,) * 2
    return {
        "sd": float(finite.std()) if finite.size else math.nan,
        "low": float(lo),
        "high": float(hi),
        "level": level,
        "places": int(sum(per_city)),
        "min_places": int(min(per_city, default=0)),
        "tiles": len(place),
    }


def gap_noise(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float:
    """The standard deviation of the difference of two independent scores' (their intervals' `sd`),
    NaN when either is unknown."""
    if not a or not b:
        return math.nan
    return float(math.hypot(a["sd"], b["sd"]))
