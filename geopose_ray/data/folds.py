"""Cross-validation folds: `make_folds(samples, n_folds, seed, mode) -> {id: fold}`, and
`config_folds(samples, cfg)`, a run's folds from its config alone: the one source of the split
that training, the fold refits and the ensemble's out-of-fold step all use (nothing is stored).

mode "place" (the default): StratifiedGroupKFold, city-stratified, with every place in one fold.
A place is the ground that several tiles show from different angles (the synthetic set renders
each twice, the real data about twenty times). The key is the cache's `place` column: the data
set's own `group` column when metadata.csv has one, else the places found at conversion
(`data.places`). Validation then scores ground that training never saw, as the test does.

mode "city": StratifiedKFold on the city, ignoring places: the leaderboard-style split. Its
validation tiles have their other views in training, so it measures how well a model knows
places it has seen; it is optimistic for new places (see README, "Folds").

Both keep every city in each fold in proportion (the metric weights cities equally: a fold
without JAX would score a different task). Splits are deterministic by seed and independent of
input order (samples are sorted by id). When every city has fewer tiles than folds, sklearn
cannot stratify: a shuffled (Group)KFold is used instead, with a warning. Fewer places than folds
is an error, never a silent fall-back to city folds.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from geopose_ray.config import DataConfig

FOLD_MODES = ("place", "city")


class HasCity(Protocol):
    id: str
    city: str


def place_key(sample: HasCity) -> str:
    """The fold key of mode "place": the cache's place, else the given group, else the tile."""
    place = getattr(sample, "place", "") or getattr(sample, "group", "")
    return f"{sample.city}/{place}" if place else f"{sample.city}/{sample.id}"


def make_folds(samples: Sequence[HasCity], n_folds: int, seed: int = 0, mode: str = "place") -> dict[str, int]:
    """id -> fold in [0, n_folds). ValueError for an unknown mode, too few tiles or places."""
    from sklearn import model_selection as ms  # a slow import: not at module import

    if mode not in FOLD_MODES:
        raise ValueError(f"fold mode must be one of {FOLD_MODES}, got {mode!r}")
    ordered = sorted(samples, key=lambda s: s.id)
    if n_folds < 2 or n_folds > len(ordered):
        raise ValueError(f"n_folds={n_folds} needs 2 <= n_folds <= number of samples ({len(ordered)})")
    cities = np.array([s.city for s in ordered])
    index = np.zeros((len(ordered), 1))  # sklearn splitters only need the length
    # sklearn's stratified splitters need at least one city with n_folds tiles
    stratify = max(Counter(cities).values()) >= n_folds
    if not stratify:
        warnings.warn(f"every city has fewer than {n_folds} tiles: folds are not stratified", stacklevel=2)
    if mode == "place":
        groups = np.array([place_key(s) for s in ordered])
        if len(set(groups)) < n_folds:
            raise ValueError(
                f"only {len(set(groups))} places for n_folds={n_folds}: lower n_folds, or set fold_mode: city"
            )
        kind = ms.StratifiedGroupKFold if stratify else ms.GroupKFold
        splitter = kind(n_folds, shuffle=True, random_state=seed)
        return _assign(ordered, splitter.split(index, cities, groups))
    if stratify:
        splitter = ms.StratifiedKFold(n_folds, shuffle=True, random_state=seed)
        return _assign(ordered, splitter.split(index, cities))
    return _assign(ordered, ms.KFold(n_folds, shuffle=True, random_state=seed).split(index))


def config_folds(samples: Sequence[HasCity], cfg: DataConfig) -> dict[str, int]:
    """id -> fold of a run, from `cfg.n_folds`, `cfg.fold_seed` and `cfg.fold_mode` only (never the
    training seed), so every trial, refit and blend of a config agrees on which tiles a member
    never saw."""
    return make_folds(samples, cfg.n_folds, cfg.fold_seed, cfg.fold_mode)


def _assign(ordered: Sequence[HasCity], splits) -> dict[str, int]:
    folds: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn's "least populated class" note
        for fold, (_, val_idx) in enumerate(splits):
            for i in val_idx:
                folds[ordered[i].id] = fold
    return folds


def places_by_fold(samples: Sequence[HasCity], fold_of: dict[str, int]) -> dict[int, dict[str, set[str]]]:
    """{fold: {city: the places its tiles show}}: what a fold's out-of-fold score rests on (the
    metric is per city, and views of one place move together)."""
    out: dict[int, dict[str, set[str]]] = {}
    for s in samples:
        if s.id in fold_of:
            out.setdefault(fold_of[s.id], {}).setdefault(s.city, set()).add(place_key(s))
    return out


def folds_to_hold(places: dict[int, dict[str, set[str]]], order: Sequence[int], min_places: int) -> int:
    """How many of `order`'s folds, taken in turn, it takes for every city to show at least
    `min_places` places out of fold (all of `order` when even they fall short)."""
    cities = {c for by_city in places.values() for c in by_city}
    seen: dict[str, set[str]] = {c: set() for c in cities}
    for k, fold in enumerate(order, 1):
        for city, ps in places.get(fold, {}).items():
            seen[city] |= ps
        if all(len(ps) >= min_places for ps in seen.values()):
            return k
    return len(order)
