"""Cross-validation folds: `make_folds(samples, n_folds, seed, mode) -> {id: fold}`, and
`config_folds(samples, cfg)`, a run's folds from its config alone: the one source of the split
that training, the fold refits and the ensemble's out-of-fold step all use (nothing is stored).

mode "city": StratifiedKFold on the city, so every fold holds each city in proportion (the
metric weights cities equally, a fold without JAX would score a different task).

mode "group": StratifiedGroupKFold, city-stratified but keeping a whole group in one fold.
Test tiles overlap train tiles and scenes repeat ~20x with small gsd/angle changes
(GEOPOSE_SPEC section 8), so random folds are optimistic. The group key is
  1. metadata.csv's `group` column when the data set has one (e.g. an offline clustering of
     scenes, or the synthetic set's scene id), else
  2. city + gsd rounded to 1 cm. A tile's gsd is set by its satellite collect, so this keeps
     the tiles of one acquisition (one view angle, one scale, one date) together: validation
     then measures angle/scale on collects the model never saw. It cannot see that two
     collects show the same place; that needs image matching (1st place) and is out of scope.

Splits are deterministic by seed and independent of input order (samples are sorted by id).
When every city has fewer tiles than folds, sklearn cannot stratify: a shuffled KFold
(GroupKFold in group mode) is used instead; with fewer groups than folds, group mode falls back
to city folds. Both with a warning.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from geopose_ray.config import DataConfig

FOLD_MODES = ("city", "group")


class HasCity(Protocol):
    id: str
    city: str
    gsd: float


def group_key(sample: HasCity) -> str:
    """The scene key used by mode "group" (see the module docstring)."""
    given = getattr(sample, "group", "")
    return f"{sample.city}/{given}" if given else f"{sample.city}/gsd{round(sample.gsd * 100):d}"


def make_folds(samples: Sequence[HasCity], n_folds: int, seed: int = 0, mode: str = "city") -> dict[str, int]:
    """id -> fold in [0, n_folds)."""
    from sklearn import model_selection as ms  # 1-2 s import: not at module import

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
    if mode == "group":
        groups = np.array([group_key(s) for s in ordered])
        if len(set(groups)) >= n_folds:
            kind = ms.StratifiedGroupKFold if stratify else ms.GroupKFold
            splitter = kind(n_folds, shuffle=True, random_state=seed)
            return _assign(ordered, splitter.split(index, cities, groups))
        warnings.warn(f"only {len(set(groups))} groups for {n_folds} folds: using city folds", stacklevel=2)
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
