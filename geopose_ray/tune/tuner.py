"""Ray Tune: the search's and the refits' Tuners, their concurrency limiter and console, and
reading an experiment folder back.

The search Tuner: OptunaSearch (the sampler of `sampler.py`, seeded, the space's defaults first)
proposes configs, ASHA stops weak ones by epoch, an `ElasticLimiter` admits as many trials as
the cluster fits. The refit Tuner: a grid over (config rank, fold) with the FIFO scheduler. Both
run the trainable of `trainer.make_trainable` and are restored the same way (`fit_or_resume`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from geopose_ray import console, ray_env, redact, storage
from geopose_ray.errors import InputError
from geopose_ray.experiment import METRIC, MODE, REFIT_CONFIGS, trial_dirname
from geopose_ray.tune import sampler as samplers
from geopose_ray.tune.capacity import Capacity
from geopose_ray.tune.progress import STATUS_EVERY_S, columns, trial_line
from geopose_ray.tune.signal import RungGate
from geopose_ray.tune.space import SearchSpace, SpaceSampler

log = logging.getLogger(__name__)
REFRESH_S = 2.0  # Tune asks for suggestions many times a second; the GCS need not be asked as often
ResourcesFn = Callable[[], tuple[dict[str, float], dict[str, float] | None]]


class ElasticLimiter(ConcurrencyLimiter):
    """`ConcurrencyLimiter` whose `max_concurrent` follows the cluster's size (`capacity.py`).

    `resources_fn` returns (the cluster's resources now, the autoscaler's maximum or None), see
    `ray_env.cluster_resources`; tests pass a fake one. It must pickle: Tune saves the searcher
    with the experiment state."""

    def __init__(
        self, searcher: Searcher, capacity: Capacity, resources_fn: ResourcesFn = ray_env.cluster_resources
    ):
        self.capacity = capacity
        self.resources_fn = resources_fn
        self._checked_at = float("-inf")
        super().__init__(searcher, max_concurrent=self._limit())

    def _limit(self) -> int:
        return self.capacity.limit(*self.resources_fn())

    def refresh(self) -> int:
        """Re-read the cluster (at most every REFRESH_S seconds); returns the current limit."""
        now = time.monotonic()
        if abs(now - self._checked_at) >= REFRESH_S:  # abs: a restored searcher's clock was another process's
            self._checked_at = now
            limit = self._limit()
            if limit != self.max_concurrent:
                log.info("cluster changed: up to %d trials at once (was %d)", limit, self.max_concurrent)
                self.max_concurrent = limit  # the public attribute ConcurrencyLimiter checks on suggest
        return self.max_concurrent

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self.refresh()
        return super().suggest(trial_id)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._checked_at = float("-inf")  # a restored search re-reads the (maybe new) cluster


# --- console ----------------------------------------------------------------------------------
class TrialLines(tune.Callback):
    """Prints `progress.trial_line` when a trial ends. Stateless (it reads the trial's own metric
    summary), so it works unchanged after `Tuner.restore`."""

    def __init__(self, params: Sequence[str], max_epochs: int):
        self.params = list(params)
        self.max_epochs = max_epochs

    def _line(self, trial: Any, error: bool) -> str:
        stats = getattr(trial, "metric_analysis", {}) or {}
        last = trial.last_result or {}
        epochs = int(stats.get("epoch", {}).get("max", last.get("epoch", 0)) or 0)
        best = stats.get(METRIC, {}).get(MODE)
        tta = last.get("score_tta")  # only after a trial's last epoch (train_loop, final_tta)
        return trial_line(
            trial.trial_id, trial.config, self.params, epochs, self.max_epochs, best, error, tta
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(self._line(trial, error=False), flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(self._line(trial, error=True), flush=True)


def run_config_kwargs(
    params: Sequence[str], max_epochs: int, columns: Sequence[str], location: str, callbacks: Sequence[Any] = ()
) -> dict[str, Any]:
    """`tune.RunConfig` arguments: the storage (`location`, a path or a URI: Ray's storage_path and
    storage_filesystem), the TrialLines callback and `callbacks`, and when `console.setup` chose
    the terse engine, verbose=1 with a CLIReporter showing `columns` (parameters) plus epoch and score."""
    path, fs = storage.for_ray(location)
    kwargs: dict[str, Any] = {
        "storage_path": path,
        "storage_filesystem": fs,
        "callbacks": [TrialLines(params, max_epochs), *callbacks],
    }
    if console.quiet():
        kwargs["verbose"] = 1
        kwargs["progress_reporter"] = tune.CLIReporter(
            metric_columns=["epoch", METRIC],
            parameter_columns=list(columns),
            max_report_frequency=STATUS_EVERY_S,
            print_intermediate_tables=True,  # verbose=1 alone prints only the trial counts
            metric=METRIC,
            mode=MODE,
            sort_by_metric=True,
        )
    return kwargs


def mlflow_callbacks(tracking_uri: str | None, experiment: str) -> list[Any]:
    """[MLflowLoggerCallback] when a tracking URI is given: each trial becomes a run of the MLflow
    experiment `experiment` with its config as params and every report as metrics. `mlflow` is
    optional: `options.check_mlflow` refuses the flag without it before Ray starts. The callback
    is pickled with the masked URI (`MaskedMLflowLogger`)."""
    if not tracking_uri:
        return []
    redact.remember(tracking_uri)
    return [_masked_mlflow_logger()(tracking_uri=tracking_uri, experiment_name=experiment, save_artifact=False)]


def __getattr__(name: str) -> Any:
    """PEP 562: `MaskedMLflowLogger` is built on first use, since importing Ray's MLflow callback
    imports mlflow (optional, seconds); unpickling one asks for it here by this name."""
    if name == "MaskedMLflowLogger":
        return _masked_mlflow_logger()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _masked_mlflow_logger() -> type:
    """Ray's MLflowLoggerCallback, whose pickle (Tune saves the run config in the experiment
    folder's tuner.pkl) holds the tracking URI masked; unpickled by a driver that was given the
    real URI (`redact.remember`), on --resume, it logs to the real one."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MaskedMLflowLogger(MLflowLoggerCallback):
        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "tracking_uri": redact.mask_url(self.tracking_uri), "tracking_token": None}

        def __setstate__(self, state: dict[str, Any]) -> None:
            uri = state.get("tracking_uri")
            self.__dict__.update({**state, "tracking_uri": redact.recall(uri) if uri else uri})

    MaskedMLflowLogger.__module__, MaskedMLflowLogger.__qualname__ = __name__, "MaskedMLflowLogger"
    return MaskedMLflowLogger


class MaskedRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose pickle (Tune saves the searcher, with its study's storage, in the
    experiment folder) holds the database URL masked; unpickled by a driver that was given the
    real URL (`redact.remember`), on --resume, it connects with the real one."""

    def __init__(self, url: str, **kwargs: Any):
        redact.remember(url)
        super().__init__(url, **kwargs)

    def __getstate__(self) -> dict[Any, Any]:
        return {**super().__getstate__(), "url": redact.mask_url(self.url)}

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__({**state, "url": redact.recall(state["url"])})


# --- the Tuners -------------------------------------------------------------------------------
def _trial_folder(trial: Any) -> str:
    return trial_dirname(trial.trial_id)


class SignalASHA(AsyncHyperBandScheduler):
    """ASHA that judges a trial only after some trial shows every target learning, and then by
    its latest score on re-measured statistics (`signal.RungGate`, which says why). Each
    decision is Ray's own bracket's: the gate only chooses which (epoch, score) it sees."""

    def __init__(self, gate: RungGate, **asha: Any):
        super().__init__(**asha)
        self.gate = gate

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        epoch = int(result[self._time_attr])
        self.gate.observe(trial.trial_id, epoch, float(result[self._metric]), result)
        if epoch >= self._max_t:
            return super().on_trial_result(tune_controller, trial, result)
        judged = self.gate.ready(trial.trial_id)
        if judged is None:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(
            tune_controller, trial, {self._time_attr: judged[0], self._metric: judged[1]}
        )

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        judged = self.gate.ready(trial.trial_id)
        self.gate.forget(trial.trial_id)
        if judged is None:  # never judged: its score enters no rung
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(
            tune_controller, trial, {self._time_attr: judged[0], self._metric: judged[1]}
        )

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.gate.forget(trial.trial_id)
        super().on_trial_remove(tune_controller, trial)


def build_searcher(
    space: SearchSpace,
    seed: int,
    study: tuple[str, str] | None = None,
    sampler: samplers.SamplerChoice | None = None,
) -> Any:
    """OptunaSearch over the define-by-run space with `sampler` (seeded; None: the space's
    `sampler:`, else auto, for up to two trials at once); its first trial is the defaults.
    `study` = (storage URL, study name): the study then lives in that database (an SQLite file or
    PostgreSQL), where `optuna-dashboard` and the report read it; None keeps it in memory."""
    from ray.tune.search.optuna import OptunaSearch

    if sampler is None:
        sampler = samplers.resolve(None, space.sampler, space.path, space.num_samples, concurrent=2)
    storage = MaskedRDBStorage(study[0]) if study else None
    return OptunaSearch(
        space=SpaceSampler(space),
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=[space.default_point()],
        sampler=samplers.build(sampler, seed),
        storage=storage,
        study_name=study[1] if study else None,
    )


def build_tuner(
    space: SearchSpace,
    trainable: Any,
    name: str,
    storage: str,
    capacity: Capacity,
    seed: int,
    resources_fn: ResourcesFn | None = None,
    study: tuple[str, str] | None = None,
    mlflow: str | None = None,
    sampler: samplers.SamplerChoice | None = None,
) -> tune.Tuner:
    """OptunaSearch + ASHA over `trainable` (the driver, or any function reporting `epoch` and
    `score`), behind an ElasticLimiter that re-reads the cluster's size (tests pass a fake
    `resources_fn`); `study` and `sampler`: see `build_searcher`; `storage`: a path or a URI;
    `mlflow`: a tracking URI, every trial then is an MLflow run of the experiment `name`. Metric and mode live
    on searcher and scheduler, not on TuneConfig: rank results with them explicitly."""
    sched = space.scheduler
    asha = dict(
        metric=METRIC,
        mode=MODE,
        time_attr="epoch",  # not training_iteration: that restarts at 1 after a restore
        max_t=sched.max_epochs,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )
    scheduler = (
        SignalASHA(RungGate(space.remeasure_every(), sched.max_epochs), **asha)
        if sched.after_signal
        else AsyncHyperBandScheduler(**asha)
    )
    searcher = build_searcher(space, seed, study, sampler)
    limiter = ElasticLimiter(searcher, capacity, resources_fn or ray_env.cluster_resources)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=limiter,
            scheduler=scheduler,
            num_samples=space.num_samples,
            max_concurrent_trials=None,  # the ElasticLimiter decides, from the live cluster
            trial_dirname_creator=_trial_folder,
        ),
        run_config=tune.RunConfig(
            name=name,
            **run_config_kwargs(
                space.searched(), sched.max_epochs, columns(space), storage, mlflow_callbacks(mlflow, name)
            ),
        ),
    )


def build_refit_tuner(
    configs: list[dict],
    jobs: list[tuple[int, int]],
    trainable: Any,
    name: str,
    storage: str,
    concurrent: int,
    space: SearchSpace,
    max_epochs: int,
) -> tune.Tuner:
    """A grid over the (config rank, fold) `jobs`, FIFO: every refit runs the full budget
    (`max_epochs`, the configs' own `epochs`)."""
    return tune.Tuner(
        trainable,
        param_space={
            REFIT_CONFIGS: configs,
            "member": tune.grid_search([{"config_rank": r, "fold": f} for r, f in jobs]),
        },
        tune_config=tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=_trial_folder,
        ),
        run_config=tune.RunConfig(
            name=name,
            **run_config_kwargs(
                space.searched(), max_epochs, ["member/config_rank", "member/fold"], storage
            ),
        ),
    )


def can_restore(experiment_dir: str | Path) -> bool:
    """Whether a Tune experiment is at this location (a path or a URI)."""
    path, fs = storage.for_ray(experiment_dir)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def fit_or_resume(
    make_tuner: Callable[[], Any], experiment_dir: str | Path, trainable: Any, resume: bool
) -> Any:
    """A new experiment, or (`resume`) the one at `experiment_dir` (a path or a URI) restored with
    its errored trials retried; the Train runs of unfinished trials resume from their latest
    checkpoints."""
    exists = can_restore(experiment_dir)
    if resume:
        if not exists:
            raise InputError(experiment_dir, "no experiment to resume here")
        path, fs = storage.for_ray(experiment_dir)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        if exists:
            raise InputError(
                experiment_dir, "experiment exists: pass --resume to finish it, or choose another --name"
            )
        tuner = make_tuner()
    return tuner.fit()


# --- reading an experiment back ---------------------------------------------------------------
def read_trials(experiment_dir: str | Path) -> list[tuple[str, str, dict[str, Any], pd.DataFrame, str]]:
    """(trial id, status, config, per-report history, path) of every trial of a Tune experiment
    (a folder or a URI: read through its filesystem), finished or not (no running Ray needed). A
    resumed trial re-reports the epochs after its last checkpoint: the history keeps the latest
    report of each epoch."""
    path, fs = storage.for_ray(experiment_dir)
    ea = tune.ExperimentAnalysis(path, storage_filesystem=fs)
    frames = ea.trial_dataframes
    rows = []
    for t in ea.trials:
        df = frames.get(t.trial_id, pd.DataFrame())
        if "epoch" in df:
            df = df.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
        rows.append((t.trial_id, str(t.status), dict(t.config), df.reset_index(drop=True), t.path))
    return rows
