"""An experiment is resumed only with the folds it started with: one made before place folds,
or with other fold settings, stops with one line (exit 2) instead of mixing two splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from geopose_ray.errors import InputError
from geopose_ray.experiment import Experiment
from geopose_ray.tune import identity, options, plan, refit_plan
from geopose_ray.tune.space import load_space

SPACE = """
num_samples: 2
scheduler: {max_epochs: 2, grace_period: 1, reduction_factor: 2}
fixed: {crop: 64, n_folds: 3}
parameters:
  lr: {type: loguniform, low: 1.0e-5, high: 1.0e-1, default: 1.0e-3}
"""


def _experiment(tmp_path: Path, options: dict | None) -> Experiment:
    exp = Experiment(tmp_path / "runs", "e")
    exp.dir.mkdir(parents=True)
    if options is not None:
        exp.options.write_text(json.dumps(options))
    return exp


def test_the_folds_an_experiment_started_with_are_the_ones_it_resumes_with(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    space = load_space(path)
    record = identity.folds_record(space)
    assert record == {"version": identity.FOLDS_VERSION, "mode": "place", "n_folds": 3, "fold_seed": 0}
    identity.check_resumable(_experiment(tmp_path / "same", {"folds": record}), space)
    for name, stored, words in [
        ("old", {"fixed": {}}, "made before leak-free place folds"),  # written by an older version
        ("none", None, "made before leak-free place folds"),  # interrupted before it wrote options
        ("other", {"folds": {**record, "n_folds": 5}}, "made with folds"),
        ("city", {"folds": {**record, "mode": "city"}}, "made with folds"),
    ]:
        with pytest.raises(InputError, match=words) as e:
            identity.check_resumable(_experiment(tmp_path / name, stored), space)
        assert "new --name" in e.value.problem


def test_the_refits_default_to_folds_that_did_not_choose_the_configs():
    opts = options.SearchOptions(space="x", fold=0)
    assert refit_plan.refit_folds(opts, 5) == (1, 2) and "free of the selection" in plan.selection_note(opts, 5)
    last = options.SearchOptions(space="x", fold=4)
    assert refit_plan.refit_folds(last, 5) == (0, 1)
    assert refit_plan.refit_folds(options.SearchOptions(space="x", fold=1), 2) == (0,)  # never the search's fold
    chosen = options.SearchOptions(space="x", fold=0, folds=(0, 1))
    assert refit_plan.refit_folds(chosen, 5) == (0, 1) and "optimistic" in plan.selection_note(chosen, 5)
