"""data.folds: deterministic, city-stratified folds; the default place mode keeps a place in one
fold; a run's folds have one source, its config (`config_folds`), shared by training and the
ensemble."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from geopose_ray.config import Config, DataConfig
from geopose_ray.constants import CITIES
from geopose_ray.data import folds
from geopose_ray.data.cache import CachedSample


def _samples(per_city: int | dict[str, int], seed: int = 0, groups: int = 0) -> list[CachedSample]:
    """Fake cached samples (files are never opened); `groups` > 0 sets a group column."""
    rng = np.random.default_rng(seed)
    counts = per_city if isinstance(per_city, dict) else dict.fromkeys(CITIES, per_city)
    out = []
    for city, n in counts.items():
        for i in range(n):
            group = f"g{rng.integers(groups)}" if groups else ""
            gsd = float(rng.choice([0.31, 0.35, 0.4, 0.45, 0.5, 0.55]))
            out.append(
                CachedSample(f"{city[:2]}{i:04d}", city, gsd, "train", Path("x"), Path("y"), 1.0, 0.0, group)
            )
    return out


def test_every_sample_gets_one_fold_and_cities_are_stratified():
    samples = _samples({"ARG": 40, "ATL": 12, "JAX": 21, "OMA": 30})
    assignment = folds.make_folds(samples, 5, seed=0)
    assert set(assignment) == {s.id for s in samples} and set(assignment.values()) == set(range(5))
    per_city_fold = Counter((s.city, assignment[s.id]) for s in samples)
    for city in Counter(s.city for s in samples):
        counts = [per_city_fold[(city, f)] for f in range(5)]
        assert max(counts) - min(counts) <= 1, (city, counts)


def test_deterministic_by_seed_and_independent_of_input_order():
    samples = _samples(25)
    a = folds.make_folds(samples, 5, seed=3)
    assert folds.make_folds(list(reversed(samples)), 5, seed=3) == a
    assert folds.make_folds(samples, 5, seed=4) != a


@pytest.mark.parametrize("mode", folds.FOLD_MODES)
@pytest.mark.parametrize("n_folds", [2, 3, 4, 5])
def test_three_tiles_per_city_work_for_2_to_5_folds(n_folds, mode):
    samples = _samples(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fallback notes
        assignment = folds.make_folds(samples, n_folds, seed=0, mode=mode)
    assert set(assignment) == {s.id for s in samples}
    sizes = Counter(assignment.values())
    assert set(sizes) == set(range(n_folds))
    if mode == "city":
        assert max(sizes.values()) - min(sizes.values()) <= 1


def test_too_many_folds_or_bad_mode_are_refused():
    with pytest.raises(ValueError):
        folds.make_folds(_samples(1), 5, seed=0)
    with pytest.raises(ValueError):
        folds.make_folds(_samples(3), 1, seed=0)
    with pytest.raises(ValueError):
        folds.make_folds(_samples(3), 3, seed=0, mode="random")


def test_the_default_keeps_each_place_in_one_fold():
    samples = _samples(30, groups=12)
    assignment = folds.make_folds(samples, 4, seed=0)
    fold_of_group: dict[tuple[str, str], set[int]] = {}
    for s in samples:
        fold_of_group.setdefault((s.city, s.group), set()).add(assignment[s.id])
    assert all(len(f) == 1 for f in fold_of_group.values())
    assert set(assignment.values()) == set(range(4))
    # plain city folds would split these places: the test can tell the modes apart
    city_folds = folds.make_folds(samples, 4, seed=0, mode="city")
    assert any(
        len({city_folds[s.id] for s in samples if (s.city, s.group) == key}) > 1 for key in fold_of_group
    )


def test_the_found_place_wins_over_the_group_and_a_tile_without_either_is_its_own_place():
    a = CachedSample("a", "ARG", 0.3, "train", Path(), None, 1.0, 0.0, group="g1", place="p7")
    b = CachedSample("b", "ARG", 0.3, "train", Path(), None, 1.0, 0.0, group="g1")
    c = CachedSample("c", "ARG", 0.3, "train", Path(), None, 1.0, 0.0)
    assert [folds.place_key(s) for s in (a, b, c)] == ["ARG/p7", "ARG/g1", "ARG/c"]


def test_fewer_places_than_folds_is_an_error_not_a_fallback():
    samples = [dataclasses.replace(s, group="one") for s in _samples(3) if s.city == "ARG"]
    with pytest.raises(ValueError, match="only 1 places"):
        folds.make_folds(samples, 3, seed=0)
    assert sorted(folds.make_folds(samples, 3, seed=0, mode="city").values()) == [0, 1, 2]


def test_config_folds_are_make_folds_of_the_config():
    samples = _samples(5, groups=4)
    for n_folds, fold_seed, mode in [(3, 0, "city"), (4, 7, "place")]:
        cfg = DataConfig(n_folds=n_folds, fold_seed=fold_seed, fold_mode=mode, fold=1)
        assert folds.config_folds(samples, cfg) == folds.make_folds(samples, n_folds, fold_seed, mode)
    base = DataConfig(n_folds=3, fold_seed=2)
    assert folds.config_folds(samples, base) != folds.config_folds(
        samples, DataConfig(n_folds=3, fold_seed=3)
    )


@pytest.mark.parametrize("mode", folds.FOLD_MODES)
def test_training_split_and_the_ensembles_oof_folds_agree(synthetic_dir, synthetic_cache, tmp_path, mode):
    """The one source: each fold's validation tiles in training are the tiles the ensemble
    predicts out-of-fold with that fold's member, for the same Config (not the training seed)."""
    from geopose_ray.data.loaders import split_samples
    from geopose_ray.ensemble.job import oof_items
    from geopose_ray.ensemble.members import Member

    flat = {"n_folds": 3, "fold_seed": 4, "fold_mode": mode, "seed": 11}
    flat.update(data_dir=str(synthetic_dir), cache_dir=str(synthetic_cache))
    cfg = Config.from_dict(flat)
    val_of = {f: {s.id for s in split_samples(cfg.replace(fold=f))[1]} for f in range(3)}
    train = [s for part in split_samples(cfg) for s in part]
    assert sorted(i for ids in val_of.values() for i in ids) == sorted(s.id for s in train)
    # the ensemble rebuilds each member's Config from its stored flat keys, another training seed
    members = {f: Member("A", f, tmp_path, config={**flat, "seed": 5, "fold": f}) for f in range(3)}
    items = oof_items([("A", members)], train)
    assert len(items) == len(train)
    assert all(item["id"] in val_of[json.loads(item["folds"])[0]] for item in items)


def test_refits_take_as_few_folds_as_hold_enough_places_per_city_out_of_fold():
    """One refit fold where it already shows MIN_OOF_PLACES places of every city, two where a
    fold holds only 2-3 (a small set), and never the search's own fold."""
    from geopose_ray.tune.options import SearchOptions
    from geopose_ray.tune.refit_plan import MIN_OOF_PLACES, refit_folds

    def places(per_city: int, views: int) -> dict:
        samples = _samples(per_city * views, groups=0)
        samples = [dataclasses.replace(s, place=f"p{i // views}") for i, s in enumerate(samples)]
        return folds.places_by_fold(samples, folds.make_folds(samples, 5, seed=0))

    many, few = places(8 * MIN_OOF_PLACES, 2), places(12, 1)  # ~8 and ~2.4 places per city a fold
    opts = SearchOptions(space="smoke")
    assert refit_folds(opts, 5, many) == (1,)
    assert refit_folds(opts, 5, few) == (1, 2)
    assert refit_folds(opts, 5) == (1, 2)  # not converted yet (a dry run): the most
    assert refit_folds(dataclasses.replace(opts, fold=4), 5, few) == (0, 1)
    assert refit_folds(dataclasses.replace(opts, folds=(0, 3)), 5, many) == (0, 3)  # --folds wins
    # a fold's places: views of one place count once, and every city is counted
    by_fold = places(10, 4)
    assert all(sum(len(by_fold[f].get(c, ())) for f in by_fold) == 10 for c in CITIES)  # one fold each
    assert folds.folds_to_hold(by_fold, (0, 1, 2), min_places=11) == 3  # even all fall short
    assert folds.folds_to_hold({0: {"ARG": {"a"}}, 1: {"ATL": {"b"}}}, (0, 1), min_places=1) == 2
