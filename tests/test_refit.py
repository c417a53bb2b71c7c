"""How a search's refits are planned and scored, without Ray: seed replicas, the out-of-fold
score that leaves the selection fold out, and the cores a lone CPU refit may take."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from geopose_ray import experiment
from geopose_ray.metrics import GeoposeScore
from geopose_ray.tune import refit, trainer
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
