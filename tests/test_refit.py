"""How a search's refits are planned and scored, without Ray: seed replicas, the out-of-fold
score that leaves the selection fold out, and the cores a lone CPU refit may take."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from geopose_ray import experiment
from geopose_ray.metrics import GeoposeScore
from geopose_ray.tune import refit, refit_choice, trainer
from geopose_ray.tune.capacity import TrialResources


def test_seed_replicas_follow_the_configs_with_new_seeds_and_new_identities():
    a, b = {"lr": 1e-3, "seed": 4, "fold": 0}, {"lr": 1e-2, "fold": 0}  # b: the Config default seed 0
    out = refit.seed_replicas([a, b], 3)
    assert [(c["lr"], c.get("seed")) for c in out] == [
        (1e-3, 4), (1e-2, None), (1e-3, 5), (1e-2, 1), (1e-3, 6), (1e-2, 2)
    ]  # fmt: skip
    assert len({experiment.config_id(c) for c in out}) == 6  # each replica is a member of its own
    assert refit.seed_replicas([a, b], 1) == [a, b]
    assert a == {"lr": 1e-3, "seed": 4, "fold": 0}  # not mutated


def test_the_searchs_own_fold_never_enters_a_configs_out_of_fold_score(tmp_path):
    """The search trial on the selection fold is a member for free, but its fold's tiles chose the
    config: the config's OOF score pools the other folds only (NaN when it has none)."""
    rng = np.random.default_rng(0)

    def sums(bias: float) -> str:
        acc = GeoposeScore()
        for i, city in enumerate(("ARG", "ATL", "JAX", "OMA") * 2):
            agl = rng.uniform(0, 20, (8, 8))
            acc.update(city, agl, agl + rng.normal(bias, 1, agl.shape), 1.0, 0.3 * i, 1.0, 0.3 * i)
        path = tmp_path / f"{bias}.npy"
        np.save(path, acc.to_array())
        return str(path)

    good, poor = sums(0.0), sums(6.0)
    members = [
        {"rank": 0, "config_id": "a", "fold": 0, "val_score": good, "selection_fold": 0},
        {"rank": 0, "config_id": "a", "fold": 1, "val_score": poor, "selection_fold": 0},
        {"rank": 1, "config_id": "b", "fold": 0, "val_score": good, "selection_fold": 0},
    ]
    refit.add_oof_scores(members)
    alone = GeoposeScore.from_array(np.load(poor)).compute()["final"]
    assert members[0]["config_oof_score"] == members[1]["config_oof_score"] == pytest.approx(alone)
    assert math.isnan(members[2]["config_oof_score"])
    assert refit.selects(members[0]) and not refit.selects(members[1])


def test_a_lone_cpu_refit_gets_the_idle_trial_slots_cores():
    settings = trainer.DriverSettings("e", "/s", resources=TrialResources(cpus_per_worker=0.95))
    wide = refit.idle_cores(settings, slots=2, jobs=1)
    assert wide["thread_factor"] == 2 and wide["resources"].cpus_per_worker == pytest.approx(1.9)
    assert refit.idle_cores(settings, slots=2, jobs=2) == {} and refit.idle_cores(settings, 3, 2) == {}
    gpu = dataclasses.replace(settings, resources=TrialResources(gpus_per_worker=1.0))
    assert refit.idle_cores(gpu, slots=4, jobs=1) == {}


CITIES = ("ARG", "ATL", "JAX", "OMA")


def _cities(*scores: float) -> dict[str, float]:
    return dict(zip(CITIES, scores))


@pytest.mark.parametrize(
    ("other", "tied"),
    [
        (_cities(0.70, 0.58, 0.66, 0.61), True),  # lower on average, by less than the cities' noise
        (_cities(0.60, 0.50, 0.55, 0.50), False),  # lower in every city, by ~0.1: the fold tells
        (_cities(0.80, 0.70, 0.75, 0.70), True),  # better is never worse than the best
        (_cities(0.70, math.nan, math.nan, math.nan), False),  # one city: no error to judge by
    ],
)
def test_a_config_is_as_good_as_the_best_only_within_its_paired_per_city_error(other, tied):
    best = _cities(0.70, 0.60, 0.65, 0.60)
    assert refit_choice.indistinguishable(best, other) is tied
    assert refit_choice.indistinguishable(None, other) is False and refit_choice.indistinguishable(best, None) is False


def test_refits_take_another_model_the_fold_cannot_tell_from_the_best_before_the_second_score():
    """Four configs ranked by the search: two learning rates of the best model, a tied config of
    another encoder, a clearly worse one of a third. Two refits: the best and the other encoder,
    not the best's own model again; three: the rest by score; one: the best alone, and then no
    per-city scores are read."""
    best = _cities(0.70, 0.60, 0.65, 0.60)
    ranked = [
        ("a", {"encoder": "tu-resnet10t", "lr": 3e-3}, best),
        ("b", {"encoder": "tu-resnet10t", "lr": 1e-3}, _cities(0.69, 0.60, 0.64, 0.60)),
        ("c", {"encoder": "resnet18", "lr": 1e-3}, _cities(0.72, 0.55, 0.66, 0.58)),
        ("d", {"encoder": "resnet34", "lr": 1e-3}, _cities(0.40, 0.30, 0.35, 0.30)),
    ]
    read: list[str] = []

    def cities(entry):
        read.append(entry[0])
        return entry[2]

    def pick(k: int) -> list[tuple[str, str]]:
        return [(e[0], why) for e, why in refit_choice.choose(ranked, k, cities, lambda e: e[1])]

    assert pick(1) == [("a", "best")] and read == []
    assert pick(2) == [("a", "best"), ("c", "another model, as good on the search's fold")]
    assert [name for name, _ in pick(3)] == ["a", "b", "c"]  # search rank order; b fills by score
    assert [name for name, _ in pick(9)] == ["a", "b", "c", "d"]
    assert refit_choice.choose([], 2, cities, lambda e: e[1]) == []
    # no per-city scores (no validation file): the second score, as before
    assert [e[0] for e, _ in refit_choice.choose(ranked, 2, lambda e: None, lambda e: e[1])] == ["a", "b"]
    # the crop is part of what makes a member differ
    assert refit_choice.family({"encoder": "x", "crop": 64}) != refit_choice.family({"encoder": "x", "crop": 128})
