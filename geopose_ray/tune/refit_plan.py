"""What the refits train, without Ray: on which folds (`refit_folds`, from the places each fold
holds, `fold_places`) and for how many epochs (`refit_epochs`: the trials' own, unless given). The search (`search.py`) runs
them and the plan (`plan.py`) prints them, from these same functions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from geopose_ray.tune.options import SearchOptions, cache_dir_of
from geopose_ray.tune.space import SearchSpace

REFIT_FOLDS = 2  # the most refit folds per config by default (refit_folds)
MIN_OOF_PLACES = 5  # per city out of fold, before a second refit fold is not needed (refit_folds)


def refit_folds(
    opts: SearchOptions, n_folds: int, places: dict[int, dict[str, set[str]]] | None = None
) -> tuple[int, ...]:
    """--folds, else the folds after the search's own, one or `REFIT_FOLDS`: as few as hold
    `MIN_OOF_PLACES` places of every city out of fold (`places`: `fold_places`; None, as in a
    dry run before conversion: the most). The search chose its configs by their scores on its
    fold's tiles, so members refit there would predict those same tiles out of fold, and the
    blend and the member choice fitted on them would inherit that selection's optimism. On other
    folds, the out-of-fold tiles never took part in choosing.

    The search's own full-budget trial is a member anyway, for the test tiles only (`refit.py`),
    so one refit fold already gives two models to average. A second fold buys out-of-fold
    places: a fold of a small data set holds 2-3 places per city, whose per-city R^2 is noise
    (docs/LEARNING.md, 'Refit folds, not seeds'); where one fold already holds enough, it would
    cost a refit's time for little (docs/LEARNING.md, 'One refit fold where it holds enough')."""
    if opts.folds is not None:
        return opts.folds
    order = tuple((opts.fold + 1 + i) % n_folds for i in range(min(REFIT_FOLDS, n_folds - 1)))
    if places is None:
        return order
    from geopose_ray.data.folds import folds_to_hold

    return order[: folds_to_hold(places, order, MIN_OOF_PLACES)]


def fold_places(opts: SearchOptions, data_dir: str | Path, space: SearchSpace) -> dict[int, dict[str, set[str]]] | None:
    """{fold: {city: places}} of the space's folds, from the data's current cache (None before
    conversion: a dry run converts nothing)."""
    from geopose_ray.data import cache, folds

    cache_dir = cache_dir_of(opts, data_dir)
    if not cache.is_current(Path(data_dir), cache_dir):
        return None
    samples = cache.load_cache(cache_dir, "train")
    with warnings.catch_warnings():  # a fold warning is the training's to give, not this count's
        warnings.simplefilter("ignore", UserWarning)
        fold_of = folds.config_folds(samples, space.default_config().data)
    return folds.places_by_fold(samples, fold_of)


def refit_epochs(opts: SearchOptions) -> tuple[int | None, str]:
    """The refits' epochs and why: --refit-epochs, else None: the trials' budget, which the data
    already scaled to the crop (`derive.trial_epochs`), so that the search's own full-budget
    trials are reused (`refit.run_refit`)."""
    if opts.refit_epochs is not None:
        return opts.refit_epochs, "--refit-epochs"
    return None, "the trials' budget"
