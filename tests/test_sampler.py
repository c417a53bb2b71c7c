"""The search's sampler (`tune/sampler.py`): each name builds its Optuna sampler with its settings,
`auto` reads the budget table (random search until the bench says otherwise), --sampler wins over
the space's `sampler:`, an unknown name stops with one line, and each sampler handles the
default space's conditional parameter. No Ray."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna
import pytest

from geopose_ray.config import Config
from geopose_ray.errors import EXIT_BAD_INPUT, InputError, run_cli
from geopose_ray.tune import launch, options, sampler, tuner
from geopose_ray.tune.space import SpaceSampler, load_space

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


def space_with(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SMOKE.read_text().replace("num_samples: 4\n", f"num_samples: 4\n{line}\n"))
    return path


@pytest.mark.parametrize(
    ("name", "cls", "attrs"),
    [
        ("random", optuna.samplers.RandomSampler, {}),
        ("tpe", optuna.samplers.TPESampler,
         {"_multivariate": True, "_group": True, "_constant_liar": True, "_n_startup_trials": 6}),
        ("gp", optuna.samplers.GPSampler, {"_n_startup_trials": 6, "_warn_independent_sampling": False}),
    ],
)  # fmt: skip
def test_each_name_builds_its_optuna_sampler_with_its_settings(name, cls, attrs):
    choice = sampler.resolve(name, None, SMOKE, trials=24, concurrent=2)
    assert (choice.name, choice.requested, choice.source, choice.reason) == (name, name, "--sampler", "set by --sampler")
    built = sampler.build(choice, seed=7)
    assert type(built) is cls
    assert {k: getattr(built, k) for k in attrs} == attrs


def test_tpe_lies_only_when_trials_run_at_once_and_starts_by_the_budget():
    alone = sampler.resolve("tpe", None, SMOKE, trials=6, concurrent=1)
    assert alone.settings == {"multivariate": True, "group": True, "constant_liar": False, "n_startup_trials": 2}
    assert [sampler.startup_trials(n) for n in (1, 6, 8, 24, 40, 64, 500)] == [2, 2, 2, 6, 10, 10, 10]
    assert "constant liar" not in sampler.describe(alone, [])
    gp = sampler.resolve("gp", None, SMOKE, trials=6, concurrent=2)
    assert sampler.describe(gp, ["huber_delta"]) == "2 random startup trials; huber_delta drawn at random (conditional)"


def test_auto_is_random_search_at_every_budget_with_its_reason():
    for trials in range(1, 201):
        rows = [row for row in sampler.AUTO if row.holds(trials)]
        assert len(rows) == 1, trials  # the table covers every budget once
    for trials in (1, 6, 11, 12, 24, 47, 48, 64, 10_000):
        choice = sampler.resolve(None, None, SMOKE, trials, concurrent=2)
        assert (choice.name, choice.requested, choice.source, choice.settings) == ("random", "auto", "default", {})
        assert choice.reason == (
            f"auto: no model-based sampler has beaten random search on the bench at {trials} trials yet "
            "(docs/SEARCH_VALUE.md)"
        )
    assert all(row.evidence == sampler.NOT_MEASURED for row in sampler.AUTO)


def test_a_measured_row_changes_what_auto_picks(monkeypatch):
    row = sampler.AutoRow(12, 47, "tpe", "tpe beat random by 0.05 > spread 0.03 at 24 trials")
    monkeypatch.setattr(sampler, "AUTO", (sampler.AutoRow(1, 11, "random", sampler.NOT_MEASURED), row,
                                          sampler.AutoRow(48, None, "random", sampler.NOT_MEASURED)))  # fmt: skip
    choice = sampler.resolve("auto", None, SMOKE, trials=24, concurrent=1)
    assert choice.name == "tpe" and choice.requested == "auto"
    assert choice.reason == f"auto at 24 trials: {row.evidence} (docs/SEARCH_VALUE.md)"
    assert sampler.resolve(None, None, SMOKE, trials=6, concurrent=1).name == "random"


def test_the_flag_wins_over_the_space_and_the_space_over_auto(tmp_path):
    path = space_with(tmp_path, "sampler: tpe")
    space = load_space(path)
    assert space.sampler == "tpe" and load_space(SMOKE).sampler is None
    opts = options.SearchOptions(space=str(path))
    from_space = options.resolve_sampler(opts, space, limit=2)
    assert (from_space.name, from_space.source, from_space.reason) == ("tpe", "space.yaml (sampler:)", "set by space.yaml (sampler:)")
    flag = options.resolve_sampler(dataclasses.replace(opts, sampler="random"), space, limit=2)
    assert (flag.name, flag.source) == ("random", "--sampler")
    auto = options.resolve_sampler(dataclasses.replace(opts, sampler="auto", num_samples=30), space, limit=2)
    assert auto.name == "random" and "at 30 trials" in auto.reason  # --num-samples is the budget
    # on a cluster that may grow, the liar is on even with one trial at once now
    grows = options.resolve_sampler(dataclasses.replace(opts, fixed_cluster=False), space, limit=1)
    assert grows.settings["constant_liar"] is True
    capped = options.resolve_sampler(dataclasses.replace(opts, fixed_cluster=False, max_concurrent=1), space, limit=1)
    assert capped.settings["constant_liar"] is False


@pytest.mark.parametrize("where", ["flag", "space"])
def test_an_unknown_sampler_exits_2_with_one_line_naming_the_flag_or_the_file(where, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "local_cluster", lambda: ({"CPU": 2.0}, None))  # no torch import for the GPUs
    argv = ["--dry-run", "--storage", str(tmp_path / "st")]
    if where == "flag":
        argv += ["--sampler", "bayes"]
    else:
        argv += ["--space", str(space_with(tmp_path, "sampler: bayes"))]
    with pytest.raises(SystemExit) as e:
        run_cli(launch.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == EXIT_BAD_INPUT and err.count("\n") == 1
    named = "--sampler" if where == "flag" else str(tmp_path / "space.yaml")
    assert err.startswith(f"error: {named}: sampler 'bayes' is not one of auto, random, tpe, gp")
    assert not (tmp_path / "st").exists()


def test_gp_without_its_packages_is_refused_before_ray(monkeypatch):
    monkeypatch.setattr(sampler.importlib.util, "find_spec", lambda name: None if name == "torch" else object())
    opts = options.SearchOptions(space=str(SMOKE), sampler="gp")
    with pytest.raises(InputError, match=r"--sampler: the gp sampler needs torch: pip install torch"):
        options.check_sampler(opts, load_space(SMOKE))
    options.check_sampler(dataclasses.replace(opts, sampler="tpe"), load_space(SMOKE))


def _objective(params: dict) -> float:
    score = -abs(math.log10(params["lr"]) + 2.5) + (0.2 if params["encoder"] == "resnet18" else 0.0)
    return score + (0.3 - abs(params["huber_delta"] - 4) / 20 if params["agl_loss"] == "huber" else 0.0)


@pytest.mark.parametrize("name", sorted(sampler.REGISTRY))
def test_every_sampler_handles_the_default_space_with_its_conditional_parameter(name):
    """An Optuna study alone (Ray's OptunaSearch asks and tells the same way): the defaults first,
    then the sampler, two trials asked at once; `huber_delta` only where `agl_loss` is huber."""
    space = load_space(SMOKE)
    study = optuna.create_study(direction="maximize", sampler=sampler.build(
        sampler.resolve(name, None, SMOKE, trials=8, concurrent=2), seed=0))  # fmt: skip
    study.enqueue_trial(space.default_point())
    for _ in range(3):
        pair = [study.ask(), study.ask()]
        for trial in pair:
            SpaceSampler(space)(trial)
        for trial in pair:
            study.tell(trial, _objective(trial.params))
    assert study.trials[0].params == space.default_point()
    for t in study.trials:
        assert ("huber_delta" in t.params) == (t.params["agl_loss"] == "huber")
        assert set(t.params) <= set(space.searched())


@pytest.mark.parametrize("name", ["random", "tpe", "gp"])
def test_rays_optuna_search_wraps_each_sampler_over_a_conditional_space(name):
    """Ray's OptunaSearch (no Ray started) asks the sampler of `--sampler NAME` through the
    define-by-run space: the defaults first, then `huber_delta` only in the trials that chose
    huber, two trials in flight at once, the results told back."""
    space = load_space(SMOKE)
    choice = sampler.resolve(name, None, space.path, trials=8, concurrent=2)  # 2 random startup trials
    searcher = tuner.build_searcher(space, seed=0, sampler=choice)
    assert type(searcher._sampler).__name__ == sampler.REGISTRY[name].optuna_class
    configs = []
    for i in range(0, 6, 2):
        pair = [searcher.suggest(f"t{i}"), searcher.suggest(f"t{i + 1}")]
        for j, cfg in enumerate(pair):
            score = -abs(math.log10(cfg["lr"]) + 2.5) + (0.3 if cfg["agl_loss"] == "huber" else 0.0)
            searcher.on_trial_complete(f"t{i + j}", {"score": score, "epoch": 1})
        configs += pair
    assert configs[0] == space.defaults()
    for cfg in configs:
        assert ("huber_delta" in cfg) == (cfg["agl_loss"] == "huber")
        Config.from_dict(cfg)
    assert len(searcher._ot_study.trials) == 6
