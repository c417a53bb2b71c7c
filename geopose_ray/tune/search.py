"""A search, start to end: resolve the options (`options.py`) against the space, the data and the
cluster, and the experiment's identity (`identity.py`); run the search Tuner (`tuner.py`:
OptunaSearch + ASHA over Ray Train runs, `trainer.py`); write the report; refit the best configs
(`refit.py`). No `ray` import here.

Needs a connected Ray (`ray_env.init`): the CLI `run_search.py` does that.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from geopose_ray import ray_env, redact
from geopose_ray.convert import ensure_cache
from geopose_ray.experiment import OPTIONS, OPTUNA_DB, REPORT_FILES
from geopose_ray.tune import refit, report, trainer, tuner
from geopose_ray.tune.identity import check_resumable, identify, write_options
from geopose_ray.tune.options import (
    FIXED_CLUSTER_CONTROLLER_RETRIES,
    SearchOptions,
    measure_data,
    optuna_study,
    resolve_capacity,
    resolve_data,
    resolve_experiment,
    resolve_resources,
    resolve_sampler,
    resolve_space,
)
from geopose_ray.tune.refit_plan import fold_places, refit_epochs, refit_folds

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    experiment_dir: Path  # the local folder holding the report (a mirror when the storage is remote)
    leaderboard: pd.DataFrame
    best_config: dict[str, Any] | None
    trials: int
    epochs_run: int  # summed over trials
    epochs_budget: int  # trials x max_epochs
    wall_s: float
    signal_epoch: int | None = None  # the first comparable epoch showing every target learning (signal.py)
    after_signal: bool = False  # whether ASHA waited for it
    members: list[dict[str, Any]] = field(default_factory=list)
    members_path: Path | None = None
    refit_leaderboard: pd.DataFrame | None = None
    interrupted: bool = False  # unfinished trials: run again with --resume
    location: str = ""  # the experiment in its storage: a local path or a URI


def run_search(opts: SearchOptions, train_fn: trainer.WorkerFn | None = None) -> SearchResult:
    """Search one fold, report, and optionally refit the top configs on every fold. `train_fn`:
    another per-worker function (see `trainer.build_trainer`)."""
    start = time.monotonic()
    data_dir = resolve_data(opts)
    ensure_cache(data_dir, opts.cache, map_fn=ray_env.task_map)  # the driver converts; trials only read
    measured = measure_data(opts, data_dir)
    space = resolve_space(opts, data_dir, measured)
    ident = identify(opts, data_dir, measured)  # the fingerprint: its study name, the resume check
    cluster, most = ray_env.cluster_resources()
    resources = resolve_resources(opts, space, cluster, most)
    exp = resolve_experiment(opts, space)
    settings = trainer.DriverSettings(
        experiment=exp.name,
        storage_path=str(exp.storage),  # a path or a URI: each trial resolves it with its own credentials
        resources=resources,
        num_to_keep=opts.num_to_keep,
        max_failures=opts.max_failures,
        controller_failure_limit=FIXED_CLUSTER_CONTROLLER_RETRIES if opts.fixed_cluster else -1,
    )
    capacity = resolve_capacity(opts, resources)
    trainable = trainer.make_trainable(settings, train_fn)
    study = optuna_study(opts, exp, ident.fingerprint)
    redact.remember(study[0], opts.mlflow)  # Tune's pickles hold them masked: restored with these
    exp.dir.mkdir(parents=True, exist_ok=True)  # SQLite creates its file, not the folder
    choice = resolve_sampler(opts, space, capacity.limit(cluster, most))
    if opts.resume:
        check_resumable(exp, space, ident.fingerprint, choice.name)
    if opts.resume and opts.optuna_storage is None:
        exp.fetch(OPTUNA_DB)  # resumed on another machine: the study's copy from the storage

    def make_tuner() -> Any:  # a new experiment only: its options (with its folds) before any trial
        write_options(exp, opts, space, resources, capacity.limit(cluster, most), ident)
        exp.push(OPTIONS)
        return tuner.build_tuner(
            space, trainable, exp.name, str(exp.storage), capacity, opts.seed,
            study=study, mlflow=opts.mlflow, sampler=choice,
        )  # fmt: skip

    tuner.fit_or_resume(make_tuner, exp.location, trainable, opts.resume)
    write_options(exp, opts, space, resources, capacity.limit(cluster, most), ident)
    records = report.load_trials(exp.location)
    board = report.write_report(exp.dir, space, study, records)
    exp.push(OPTIONS, *REPORT_FILES, *([] if opts.optuna_storage else [OPTUNA_DB]))
    result = SearchResult(
        experiment_dir=exp.dir,
        leaderboard=board,
        best_config=report.best_config(board, records),
        trials=len(board),
        epochs_run=int(board["epochs_run"].sum()) if len(board) else 0,
        epochs_budget=len(board) * space.scheduler.max_epochs,
        wall_s=0.0,
        location=exp.location,
        signal_epoch=report.signal_epoch(records, space),
        after_signal=space.scheduler.after_signal,
    )
    result.interrupted = report.unfinished(board) > 0
    if result.interrupted:
        log.warning(
            "search interrupted: %d trials unfinished; finish with --resume", report.unfinished(board)
        )
    elif opts.refit_top > 0:
        folds = refit_folds(opts, space.n_folds(), fold_places(opts, data_dir, space))
        concurrent = capacity.limit(*ray_env.cluster_resources())  # refits: fixed, from the cluster now
        out = refit.run_refit(
            exp, space, settings, opts.refit_top, folds, concurrent, opts.resume, train_fn,
            opts.refit_seeds, refit_epochs(opts)[0],
        )  # fmt: skip
        result.members, result.members_path, result.refit_leaderboard = out
        result.interrupted = result.members_path is None
    result.wall_s = time.monotonic() - start
    return result
