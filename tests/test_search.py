"""The search: concurrency, refit selection and the report (no Ray); Optuna + ASHA with a plain
Tune function (seconds); one end-to-end smoke search + fold refit through Ray Train; and a
driver killed mid-search then resumed (subprocess, its own Ray)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from geopose_ray import experiment
from geopose_ray.config import Config
from geopose_ray.errors import InputError
from geopose_ray.experiment import trial_train_config
from geopose_ray.metrics import GeoposeScore
from geopose_ray.tune import options, refit, report, search, tuner
from geopose_ray.tune.capacity import Capacity, TrialResources
from geopose_ray.tune.space import load_space

ROOT = Path(__file__).resolve().parents[1]

PLAIN_SPACE = """
num_samples: 6
scheduler: {max_epochs: 2, grace_period: 1, reduction_factor: 2}
fixed: {crop: 64}
parameters:
  agl_loss: {type: choice, values: [mse, huber], default: mse}
  huber_delta: {type: uniform, low: 1.0, high: 10.0, default: 5.0, when: {agl_loss: huber}}
  lr: {type: loguniform, low: 1.0e-5, high: 1.0e-1, default: 1.0e-3}
"""

# Real training on 64 px synthetic tiles; lr 5e-2 diverges within an epoch (score << default's).
SMOKE_SPACE = """
num_samples: 4
scheduler: {max_epochs: 2, grace_period: 1, reduction_factor: 2}
fixed: {n_folds: 3, crop: 64, val_crop: 64, batch_size: 2, val_batch_size: 2, threads: 1, precision: fp32,
        encoder_weights: null, photo_aug: none, schedule: constant, arch: Unet}
parameters:
  encoder: {type: choice, values: [resnet18, tu-resnet18], default: resnet18}
  lr: {type: choice, values: [1.0e-3, 5.0e-2], default: 1.0e-3}
"""


def write_space(tmp_path: Path, text: str, name: str = "space") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def record(tid: str, cfg: dict, scores: list[float], status: str = "TERMINATED") -> report.TrialRecord:
    hist = pd.DataFrame({"epoch": range(1, len(scores) + 1), "score": scores, "node_id": "n1"})
    return report.TrialRecord(tid, status, cfg, hist, f"/x/{tid}")


# --- no Ray -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_first_trial_optuna_proposes_is_the_defaults(path):
    space = load_space(path)
    searcher = tuner.build_searcher(space, seed=0)
    assert searcher.suggest("first") == space.defaults()
    second = searcher.suggest("second")
    assert set(second) - set(space.defaults()) <= set(space.searched())
    Config.from_dict(second)


def test_trial_train_config_search_and_refit():
    assert trial_train_config({"lr": 0.1, "fold": 0, "bookkeeping": 1}) == {"lr": 0.1, "fold": 0}
    refit_cfg = {
        "refit_configs": [{"lr": 0.1, "fold": 0}, {"lr": 0.2, "fold": 0}],
        "member": {"config_rank": 1, "fold": 2},
    }
    assert trial_train_config(refit_cfg) == {"lr": 0.2, "fold": 2}


def test_parse_folds():
    assert options.parse_folds("0,1") == (0, 1)
    assert options.parse_folds("3") == (0, 1, 2)
    assert options.parse_folds("2,4") == (2, 4)
    for bad in ("x", "0,0", "-1,2", "0"):
        with pytest.raises(InputError):
            options.parse_folds(bad)


def test_top_configs_are_distinct_finished_and_finite():
    a, b, c = {"lr": 1e-3, "fold": 0}, {"lr": 1e-2, "fold": 0}, {"lr": 1e-4, "fold": 0}
    recs = [
        record("t1", a, [0.1, 0.5]),
        record("t2", dict(a), [0.2, 0.6]),  # same config as t1, better: represents it
        record("t3", b, [0.4]),
        record("t4", c, [0.9], status="ERROR"),
        record("t5", {"lr": 0.5, "fold": 0}, [math.nan]),
    ]
    assert [r.trial_id for r in refit.top_configs(recs, 5)] == ["t2", "t3"]
    assert [r.trial_id for r in refit.top_configs(recs, 1)] == ["t2"]
    cid = experiment.config_id(a)
    assert cid == experiment.config_id({**a, "fold": 3, "data_dir": "/elsewhere"})  # run keys excluded
    assert cid == experiment.config_id({**a, "precise_bn_every": 5})  # a validation's statistics, not the weights
    assert refit.reusable(recs, cid, fold=0, max_epochs=2).trial_id == "t2"
    assert refit.reusable(recs, cid, fold=1, max_epochs=2) is None
    assert refit.reusable(recs, experiment.config_id(b), fold=0, max_epochs=2) is None  # stopped at 1


def test_longer_refits_are_new_configs_and_never_reuse_the_searchs_shorter_trials():
    a = {"lr": 1e-3, "fold": 0, "epochs": 2}
    recs = [record("t1", a, [0.2, 0.6])]  # the search's full-budget trial of `a` on fold 0
    rung = {**a, "precise_bn_every": 1}  # the search's ASHA re-measured statistics at its rungs
    assert refit.with_epochs([rung], None) == [{**a, "precise_bn_every": 0}]  # a refit has no rung
    (longer,) = refit.with_epochs([a], 5)
    assert longer == {**a, "epochs": 5, "precise_bn_every": 0} and a["epochs"] == 2  # not mutated
    assert experiment.config_id(longer) != experiment.config_id(a)  # a member of its own
    reused, jobs = refit.plan_jobs(recs, [a], (0, 1), max_epochs=2)
    assert list(reused) == [(0, 0)] and jobs == [(0, 1)]  # same budget: fold 0 is the search's trial
    reused, jobs = refit.plan_jobs(recs, [longer], (0, 1), max_epochs=5)
    assert reused == {} and jobs == [(0, 0), (0, 1)]  # longer: both folds trained again


def test_a_trial_is_stopped_early_only_before_its_own_epoch_budget(tmp_path):
    space = load_space(write_space(tmp_path, PLAIN_SPACE.replace("max_epochs: 2", "max_epochs: 4")))
    recs = [
        record("short_refit", {"lr": 1e-3, "fold": 1, "epochs": 2}, [0.2, 0.3]),  # --refit-epochs 2
        record("long_refit", {"lr": 1e-3, "fold": 1, "epochs": 6}, [0.2, 0.3, 0.4, 0.5]),  # cut at 4
        record("search", {"lr": 1e-3, "fold": 0}, [0.1, 0.2]),  # no epochs key: the space's 4
    ]
    row = report.leaderboard(recs, space).set_index("trial_id")
    assert not row.loc["short_refit", "stopped_early"]
    assert row.loc["long_refit", "stopped_early"] and row.loc["search", "stopped_early"]


def test_leaderboard_and_importances_from_records(tmp_path):
    space = load_space(write_space(tmp_path, PLAIN_SPACE.replace("max_epochs: 2", "max_epochs: 4")))
    recs = [
        record("full", {"agl_loss": "mse", "lr": 1e-3, "fold": 0}, [0.2, 0.3, 0.5, 0.4]),
        record("early", {"agl_loss": "huber", "huber_delta": 2.0, "lr": 1e-2, "fold": 0}, [0.1]),
        record("broken", {"agl_loss": "mse", "lr": 1e-1, "fold": 0}, [-3.0, -2.0], status="ERROR"),
        record("mid", {"agl_loss": "huber", "huber_delta": 7.0, "lr": 1e-4, "fold": 0}, [0.0, 0.35]),
    ]
    board = report.leaderboard(recs, space)
    assert list(board["trial_id"]) == ["full", "mid", "early", "broken"]
    row = board.set_index("trial_id")
    assert row.loc["full", "score"] == 0.5 and row.loc["full", "best_epoch"] == 3
    assert row.loc["full", "epochs_run"] == 4 and not row.loc["full", "stopped_early"]
    assert row.loc["early", "stopped_early"] and row.loc["mid", "stopped_early"]
    assert not row.loc["broken", "stopped_early"]  # errors are not early stops
    assert pd.isna(row.loc["full", "huber_delta"]) and row.loc["mid", "huber_delta"] == 7.0
    assert {"node_id", "fold", "agl_loss", "lr"} <= set(board.columns)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"  # the search's study, as OptunaSearch stores it
    study = optuna.create_study(study_name="exp", storage=url, direction="maximize")
    dists = {p.name: p.distribution() for p in space.parameters}
    for r in recs:
        params = {k: v for k, v in r.train_config.items() if k in dists}
        trial = optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params}, value=r.best()[0])
        study.add_trial(trial)
    imp = report.param_importances((url, "exp"))
    assert imp["trials"] == 4 and set(imp["importances"]) <= {"agl_loss", "lr", "huber_delta"}
    assert math.isclose(sum(imp["importances"].values()), 1.0, rel_tol=1e-6)
    assert report.param_importances((url, "no such study"))["importances"] == {}
    assert "full" in report.format_table(board)
    assert report.unfinished(board) == 0  # errors count as finished
    running = record("running", {"agl_loss": "mse", "lr": 1e-3, "fold": 0}, [0.1], status="RUNNING")
    assert report.unfinished(report.leaderboard([*recs, running], space)) == 1  # interrupted run


def test_score_vs_epoch_dots_the_epochs_with_re_measured_statistics():
    """A search trial re-measures its statistics every `precise_bn_every` epochs and after its
    last; only those validations are what ASHA reads, so only they are dots (a trial without
    re-measures keeps every epoch a dot)."""
    search = record("s1", {"precise_bn_every": 3, "epochs": 7}, [0.1, -0.9, 0.4, -1.2, -0.5, 0.6, 0.7])
    plain = record("r1", {"precise_bn_every": 0}, [0.2, 0.3])
    fig = report.score_vs_epoch_figure([search, plain])
    dotted = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].lines if line.get_marker() == "o"}
    assert dotted == {"s1": [3, 6, 7], "r1": [1, 2]}
    assert "re-measured" in fig.axes[0].get_ylabel()
    # epochs that skipped validation (val_every 3) repeat the last figures: neither line nor dot
    spaced = record("s2", {"precise_bn_every": 3, "val_every": 3, "epochs": 7}, [0.1, 0.1, 0.4, 0.4, 0.4, 0.6, 0.7])
    fig = report.score_vs_epoch_figure([spaced])
    assert {tuple(line.get_xdata()) for line in fig.axes[0].lines} == {(1, 3, 6, 7), (3, 6, 7)}


def test_resolve_space_and_resources(tmp_path):
    path = write_space(tmp_path, PLAIN_SPACE + "resources: {cpus_per_worker: 0.5}\n")
    opts = search.SearchOptions(
        space=str(path), max_epochs=1, num_samples=9, fold=2, cache=str(tmp_path / "c")
    )
    space = search.resolve_space(opts, "/data")
    assert space.scheduler.max_epochs == 1 and space.scheduler.grace_period == 1
    assert space.num_samples == 9
    defaults = space.defaults()
    assert defaults["epochs"] == 1 and defaults["fold"] == 2 and defaults["data_dir"] == "/data"
    assert defaults["cache_dir"] == str((tmp_path / "c").resolve())
    Config.from_dict(defaults)
    assert defaults["precise_bn_every"] == 0  # grace = max_epochs: no rung before the last epoch
    rungs = search.resolve_space(search.SearchOptions(space=str(path)), "/data").defaults()
    assert rungs["precise_bn_every"] == 1  # ASHA's rungs (multiples of its grace) see whole-tile statistics
    assert rungs["val_every"] == 1 and "val_every" not in defaults  # validated where the rungs read
    with pytest.raises(InputError, match="fold"):
        search.resolve_space(search.SearchOptions(space=str(path), fold=5), "/data")
    res = search.resolve_resources(search.SearchOptions(space=str(path)), space, {"CPU": 4.0})
    assert (res.workers_per_trial, res.cpus_per_worker, res.gpus_per_worker) == (2, 0.5, 0.0)
    res = search.resolve_resources(
        search.SearchOptions(space=str(path), cpus_per_worker=2), space, {"CPU": 8.0, "GPU": 2}
    )
    assert res.cpus_per_worker == 2.0 and res.gpus_per_worker == 1.0  # GPUs in the cluster: 1 each
    with pytest.raises(InputError, match="workers"):
        search.resolve_resources(
            search.SearchOptions(space=str(path), workers_per_trial=9), space, {"CPU": 4.0}
        )
    grows = search.SearchOptions(space=str(path), gpus_per_worker=1, fixed_cluster=False)  # autoscaler
    assert search.resolve_resources(grows, space, {"CPU": 4.0}).gpus_per_worker == 1.0


@pytest.mark.parametrize(
    ("grace", "extra", "expected"),
    [
        (3, "", 3),  # the trials validate at the epochs ASHA and the signal gate read: its grace's multiples
        (3, "  val_every: 2\n", 2),  # a space's own value wins
        (3, "  schedule: plateau\n", None),  # steps on every epoch's score: validates every epoch
        (12, "", None),  # no rung before the last epoch (grace = max_epochs): nothing to space by
    ],
)
def test_trials_validate_only_where_the_rungs_read(tmp_path, grace, extra, expected):
    space = PLAIN_SPACE.replace("{max_epochs: 2, grace_period: 1,", f"{{max_epochs: 12, grace_period: {grace},")
    path = write_space(tmp_path, space.replace("fixed: {crop: 64}\n", "fixed:\n  crop: 64\n" + extra))
    defaults = search.resolve_space(search.SearchOptions(space=str(path)), "/data").defaults()
    assert defaults.get("val_every") == expected


# --- Optuna + ASHA with a plain Tune function (seconds) -----------------------------------------
SECRET = "s3cret"


def test_tunes_pickles_hold_urls_masked_and_a_resumed_driver_restores_them(tmp_path):
    """The Optuna storage and the MLflow callback go into tuner.pkl and the searcher's state:
    pickled with the URL masked, unpickled with the real one the driver was given again."""
    from ray import cloudpickle

    from geopose_ray import redact

    url = f"sqlite:///file:{tmp_path / 'o.db'}?mode=rwc&uri=true&token={SECRET}"
    study = optuna.create_study(storage=tuner.MaskedRDBStorage(url), study_name="s")
    uri = f"https://alice:{SECRET}@mlflow.example/"
    callback = tuner.mlflow_callbacks(uri, "s")[0]
    for obj, field in ((study._storage._backend, "url"), (callback, "tracking_uri")):
        blob = cloudpickle.dumps(obj)
        assert SECRET.encode() not in blob
        assert getattr(cloudpickle.loads(blob), field) in (url, uri)  # this driver remembers it
        redact._REAL.clear()  # another process that was not given the URL again
        assert "***" in getattr(cloudpickle.loads(blob), field)
        redact.remember(url, uri)


def plain_trainable(config: dict) -> None:
    """Score peaks at lr = 1e-3 (the default) and rises slowly with epochs."""
    from ray import tune

    quality = -abs(math.log10(config["lr"]) + 3.0)
    for epoch in range(1, config["epochs"] + 1):
        tune.report({"epoch": epoch, "score": quality + 0.01 * epoch, "val_loss": -quality})


@pytest.mark.ray
def test_optuna_asha_search_and_report(ray_session, tmp_path):
    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    space = search.resolve_space(search.SearchOptions(space=str(write_space(tmp_path, PLAIN_SPACE))), "/data")
    trainable = tune.with_resources(plain_trainable, {"CPU": 0.01})
    exp = tmp_path / "exp"

    # a token in the study's URL (SQLite passes the URI's other keys on unread): used to connect,
    # never written, though Tune pickles the searcher and its storage into the experiment folder
    study = (f"sqlite:///file:{tmp_path / 'optuna.db'}?mode=rwc&uri=true&token={SECRET}", "exp")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a local MLflow store (its file store is deprecated)

    def make_tuner():
        cap = Capacity(TrialResources(), cap=1)
        return tuner.build_tuner(space, trainable, "exp", str(tmp_path), cap, seed=3, study=study, mlflow=mlflow_uri)

    tuner.fit_or_resume(make_tuner, exp, trainable, resume=False)
    recs = report.load_trials(exp)
    stored = optuna.load_study(study_name="exp", storage=study[0]).trials  # the study lives in the file
    assert len(stored) == space.num_samples and stored[0].params == {"agl_loss": "mse", "lr": 1e-3}
    assert len(recs) == space.num_samples
    first = next(r for r in recs if r.config["lr"] == 1e-3 and r.config["agl_loss"] == "mse")  # defaults
    assert recs[0].trial_id == first.trial_id  # points_to_evaluate: the defaults run first
    for r in recs:
        cfg = r.train_config
        assert ("huber_delta" in cfg) == (cfg["agl_loss"] == "huber")
        assert cfg["crop"] == 64 and cfg["epochs"] == 2 and cfg["data_dir"] == "/data"
    board = report.write_report(exp, space, study)
    row = board.set_index("trial_id")
    assert row.loc[first.trial_id, "epochs_run"] == 2 and not row.loc[first.trial_id, "stopped_early"]
    # one trial at a time: the default (the optimum) reaches the epoch-1 rung first, so the next
    # trial, worse by construction, is stopped there; a stopped trial ran exactly 1 epoch
    assert row.loc[recs[1].trial_id, "stopped_early"] and row.loc[recs[1].trial_id, "epochs_run"] == 1
    assert (board["epochs_run"] == board["stopped_early"].map({True: 1, False: 2})).all()
    best = yaml.safe_load((exp / experiment.BEST_CONFIG).read_text())
    assert best["lr"] == 1e-3 and best["agl_loss"] == "mse"
    assert set(json.loads((exp / experiment.IMPORTANCES).read_text())["importances"]) <= {
        "agl_loss",
        "lr",
        "huber_delta",
    }
    for png in (experiment.SCORE_VS_EPOCH, experiment.SCORE_BY_PARAM):
        assert (exp / png).read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(exp / experiment.LEADERBOARD)) == space.num_samples
    _check_mlflow_runs(mlflow_uri, recs)
    written = [p for p in exp.rglob("*") if p.is_file()]
    assert any(p.name == "tuner.pkl" for p in written) and not [p for p in written if SECRET.encode() in p.read_bytes()]
    with pytest.raises(InputError, match="--resume"):
        tuner.fit_or_resume(make_tuner, exp, trainable, resume=False)
    with pytest.raises(InputError, match="no experiment"):
        tuner.fit_or_resume(make_tuner, tmp_path / "none", trainable, resume=True)


def _check_mlflow_runs(uri: str, recs: list[report.TrialRecord]) -> None:
    """`--mlflow`: one run per trial (named after it) in the MLflow experiment named after the
    search, with the trial's config as params and its reports as metrics."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == len(recs)
    for rec in recs:
        (run,) = [r for r in runs if r.info.run_name.endswith(f"_{rec.trial_id}")]
        assert float(run.data.params["lr"]) == rec.config["lr"]
        assert run.data.params["agl_loss"] == rec.config["agl_loss"]
        assert run.data.metrics["score"] == pytest.approx(rec.history["score"].iloc[-1])
        assert run.data.metrics["epoch"] == rec.epochs_run()


# --- end to end through Ray Train (real worker) -------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_smoke_search_then_refit_on_two_folds(ray_session, synthetic_dir, tmp_path):
    opts = search.SearchOptions(
        # plain ASHA: 2-epoch trials learn no target, so signal.py's gate would cut nothing
        # (tests/test_signal.py), and this test needs stopped trials to free their CPUs
        space=str(write_space(tmp_path, SMOKE_SPACE.replace("factor: 2}", "factor: 2, after_signal: false}"), "e2e")),
        data=str(synthetic_dir),
        storage=str(tmp_path / "storage"),
        workers_per_trial=2,
        cpus_per_worker=1.0,  # 4-CPU fixture: one trial at a time, so the default reaches rung 1 first
        refit_top=1,  # seed replicas are planned (test_seed_replicas_follow_...) and run like
        folds=(0, 1),  # these refits; each nested run costs ~25 s here
        refit_epochs=3,  # longer than the search's 2: both folds are trained again, for 3 epochs
        seed=0,
    )
    res = search.run_search(opts)
    board = res.leaderboard
    assert res.trials == len(board) >= 4
    assert board["stopped_early"].any(), board
    assert not res.after_signal
    assert (board["status"] == "TERMINATED").all()
    assert board["node_id"].notna().all()
    assert res.epochs_run == board["epochs_run"].sum() < res.epochs_budget == 2 * len(board)
    # the product's views score a trial's last epoch only: trials ASHA stopped have no such figure
    ended = board["epochs_run"] == 2
    assert board.loc[ended, "score_tta"].notna().all() and board.loc[~ended, "score_tta"].isna().all()
    members = json.loads(res.members_path.read_text())
    assert members == res.members and [(m["rank"], m["fold"]) for m in members] == [(0, 0), (0, 1)]
    (cid,) = {m["config_id"] for m in members}
    assert cid != board["config_id"].iloc[0]  # the best config for 3 epochs: a config of its own
    assert [m["source"] for m in members] == ["refit", "refit"]
    assert [m["chosen_as"] for m in members] == ["best", "best"]
    # what refit_choice compares configs by: the best trial's per-city scores on the search's fold
    exp = experiment.Experiment(opts.storage, "e2e")
    (best_rec,) = [r for r in report.load_trials(exp.location) if r.trial_id == board["trial_id"].iloc[0]]
    cities = refit.search_cities(exp, best_rec)
    assert cities is not None and sum(math.isfinite(v) for v in cities.values()) >= 1
    best = board.iloc[0]  # the refits carry the figures of the search trial that chose their config
    for m in members:
        assert m["search_score"] == pytest.approx(best["score"])
        tta = m["search_score_tta"]
        assert (tta is None and pd.isna(best["score_tta"])) or tta == pytest.approx(best["score_tta"])
        assert m["search_epochs"] == best["epochs_run"]  # the budget behind those figures
    assert all(m["config"]["epochs"] == 3 for m in members)
    refits = [m for m in members if m["source"] == "refit"]
    assert refits and all(m["experiment"].endswith("-refit") for m in refits)
    for m in members:
        assert (Path(m["checkpoint"]) / "state.pt").is_file()
        assert Config.from_dict(m["config"]).data.fold == m["fold"]
        own = GeoposeScore.from_array(np.load(m["val_score"])).compute()  # this fold's accumulators
        assert own["final_present"] == pytest.approx(m["score"], abs=1e-6)
    # the config's out-of-fold score pools its own folds but the search's (fold 0 chose it)
    assert all(m["selection_fold"] == 0 for m in members)
    pooled = sum(GeoposeScore.from_array(np.load(m["val_score"])) for m in members if m["fold"] != 0).compute()
    want = pooled["final"] if math.isfinite(pooled["final"]) else pooled["final_present"]  # one fold: a city may lack
    assert all(m["config_oof_score"] == pytest.approx(want) for m in members)
    refit_board = res.refit_leaderboard
    assert not refit_board["stopped_early"].any() and (refit_board["epochs_run"] == 3).all()
    assert set(refit_board["fold"]) == {m["fold"] for m in refits}
    for name in (experiment.LEADERBOARD, experiment.BEST_CONFIG, experiment.IMPORTANCES, experiment.OPTIONS):
        assert (res.experiment_dir / name).is_file()
