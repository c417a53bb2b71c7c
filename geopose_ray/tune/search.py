"""Layer 1: the Tuner. OptunaSearch (TPE, seeded, the space's defaults first) proposes configs,
ASHA stops weak ones by epoch, every trial is one Ray Train run (`driver.py`); then the report,
and optionally the fold refit of the best configs (`refit.py`).

Needs a connected Ray (`ray.init`) — the CLI `run_search.py` does that and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from geopose_ray import paths
from geopose_ray.atomic import atomic_write_text
from geopose_ray.errors import InputError
from geopose_ray.tune import progress
from geopose_ray.tune.capacity import Capacity, ElasticLimiter, cluster_resources, knows_every_need
from geopose_ray.tune.driver import (
    METRIC,
    MODE,
    DriverSettings,
    TrialResources,
    make_trainable,
    trial_dirname,
)
from geopose_ray.tune.space import SearchSpace, SpaceSampler, load_space

log = logging.getLogger(__name__)
DEFAULT_WORKERS = 2
FIXED_CLUSTER_CONTROLLER_RETRIES = 5  # x 60 s worker-group start timeouts, then the trial errors
DEFAULT_CPUS_PER_WORKER = 1.0
OPTIONS_FILE = "search_options.json"


@dataclass
class SearchOptions:
    """Everything `run_search.py` accepts (None = from the space's hints, then the defaults)."""

    space: str
    data: str | None = None  # None: the embedded synthetic set (generated when missing)
    cache: str | None = None
    storage: str | None = None  # None: paths.default_storage()
    name: str | None = None  # None: the space file's stem
    num_samples: int | None = None
    workers_per_trial: int | None = None
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None
    fold: int = 0
    folds: tuple[int, ...] | None = None  # refit folds; None: the search fold (its trials are reused)
    refit_top: int = 0
    resume: bool = False
    seed: int = 0
    max_epochs: int | None = None
    num_to_keep: int = 2  # best Train checkpoints kept per trial (plus the latest)
    max_failures: int = 1  # Train worker-group restarts per trial
    fixed_cluster: bool = True  # a cluster that cannot grow (ray.init(address="local")): refuse misfits
    overrides: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE: more fixed settings
    max_concurrent: int | None = None  # cap on trials at once; None: as many as the cluster fits
    pending_trials: int | None = None  # admitted beyond what fits (autoscaler demand); None: 0 fixed, else 1
    train_fn: Callable[[dict], None] | None = field(default=None, repr=False)  # tests: stand-in worker


@dataclass
class SearchResult:
    experiment_dir: Path
    leaderboard: pd.DataFrame
    best_config: dict[str, Any] | None
    trials: int
    epochs_run: int  # summed over trials
    epochs_budget: int  # trials x max_epochs
    wall_s: float
    members: list[dict[str, Any]] = field(default_factory=list)
    members_path: Path | None = None
    refit_leaderboard: pd.DataFrame | None = None
    interrupted: bool = False  # unfinished trials: run again with --resume


def load_run_space(opts: SearchOptions) -> SearchSpace:
    """The space file with --set overrides; a named init_checkpoint must exist here (else every
    trial would fail on its worker). Needs no Ray: the CLI calls it before starting one."""
    space = load_space(opts.space).with_fixed(opts.overrides)
    init = space.fixed.get("init_checkpoint")
    if init:
        from geopose_ray.checkpoint import check_init_checkpoint

        check_init_checkpoint(init, space.defaults())
    return space


def resolve_space(opts: SearchOptions, data_dir: str) -> SearchSpace:
    """The space with this run's settings folded in: --set overrides, data, fold and the epoch budget."""
    space = load_run_space(opts)
    sched = space.scheduler
    if opts.max_epochs is not None:
        if opts.max_epochs < 1:
            raise InputError("--max-epochs", f"must be >= 1, got {opts.max_epochs}")
        sched = dataclasses.replace(
            sched, max_epochs=opts.max_epochs, grace_period=min(sched.grace_period, opts.max_epochs)
        )
    run = {
        "data_dir": data_dir,
        "fold": opts.fold,
        **({"cache_dir": str(Path(opts.cache).resolve())} if opts.cache else {}),
    }
    n_folds = int(space.fixed.get("n_folds", 5))
    if not 0 <= opts.fold < n_folds:
        raise InputError(space.path, f"--fold {opts.fold} is not in 0..{n_folds - 1} (n_folds {n_folds})")
    return dataclasses.replace(
        space,
        fixed={**space.fixed, **run},
        scheduler=sched,
        num_samples=opts.num_samples or space.num_samples,
    )


def resolve_resources(
    opts: SearchOptions, space: SearchSpace, cluster: dict[str, float], most: dict[str, float] | None = None
) -> TrialResources:
    """Command line > the space's `resources` hints > defaults. A trial that cannot fit the
    cluster is refused when `opts.fixed_cluster` (a local instance: it would wait forever) or when
    it cannot fit even the largest cluster the autoscaler may build (`most`), and only warned
    about otherwise (the autoscaler, or a node joined by hand, may add what is missing)."""
    hint = space.resources
    gpus = opts.gpus_per_worker
    if gpus is None:
        gpus = hint.get("gpus_per_worker", 1.0) if cluster.get("GPU", 0) > 0 else 0.0
    res = TrialResources(
        workers_per_trial=int(opts.workers_per_trial or hint.get("workers_per_trial", DEFAULT_WORKERS)),
        cpus_per_worker=float(
            opts.cpus_per_worker
            if opts.cpus_per_worker is not None
            else hint.get("cpus_per_worker", DEFAULT_CPUS_PER_WORKER)
        ),
        gpus_per_worker=float(gpus),
    )
    if not res.fits(cluster):
        have = {k: cluster.get(k, 0) for k in ("CPU", "GPU")}
        problem = (
            f"one trial needs {res.workers_per_trial} workers x {res.per_worker()} (+ a driver), the cluster "
            f"has {have}: lower --workers-per-trial / --cpus-per-worker / --gpus-per-worker"
        )
        if opts.fixed_cluster:
            raise InputError(space.path, problem)
        if knows_every_need(most, res) and not res.fits(most):
            raise InputError(space.path, f"{problem}; the autoscaler's largest cluster has {most}")
        log.warning("%s (waiting for the autoscaler)", problem)
    return res


def pin_local_address() -> str:
    """Choose the GCS port of the local instance about to start and export its address as
    RAY_ADDRESS, so every process of it (the raylet inherits this environment) finds its own
    cluster. Ray Train's placement-group cleaner looks the cluster up by RAY_ADDRESS; with two
    instances on one machine and none set it fails, and an ASHA-stopped trial's workers then
    hold their CPUs forever. Call just before `ray.init(address="local")`."""
    import socket

    import ray.util

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = address
    return address


def check_capacity_options(opts: SearchOptions) -> None:
    """--pending-trials >= 0, --max-concurrent >= 1 (checked before Ray starts)."""
    if opts.pending_trials is not None and opts.pending_trials < 0:
        raise InputError("--pending-trials", f"must be >= 0, got {opts.pending_trials}")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise InputError("--max-concurrent", f"must be >= 1, got {opts.max_concurrent}")


def resolve_capacity(opts: SearchOptions, resources: TrialResources) -> Capacity:
    """A fixed local instance admits only what fits; a joined cluster without an autoscaler config
    keeps one trial pending by default (see `geopose_ray.tune.capacity`)."""
    check_capacity_options(opts)
    pending = opts.pending_trials if opts.pending_trials is not None else (0 if opts.fixed_cluster else 1)
    return Capacity(resources, pending=pending, cap=opts.max_concurrent)


def resolve_data(opts: SearchOptions) -> str:
    if opts.data is None:
        from geopose_ray.train import ensure_default_data

        return str(ensure_default_data(paths.default_data_dir()))
    data = Path(opts.data).resolve()
    if not data.is_dir():
        raise InputError(data, "data folder not found")
    return str(data)


def build_searcher(space: SearchSpace, seed: int) -> Any:
    """OptunaSearch over the define-by-run space (TPE, seeded); its first trial is the defaults."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(
        space=SpaceSampler(space),
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=[space.default_point()],
        sampler=optuna.samplers.TPESampler(seed=seed),
    )


def build_tuner(
    space: SearchSpace,
    trainable: Any,
    name: str,
    storage: str,
    capacity: Capacity,
    seed: int,
    resources_fn: Callable[[], tuple[dict[str, float], dict[str, float] | None]] | None = None,
) -> Any:
    """OptunaSearch + ASHA over `trainable` (the driver, or any function reporting `epoch` and
    `score`), behind an ElasticLimiter that re-reads the cluster's size (tests pass a fake
    `resources_fn`). Metric and mode live on searcher and scheduler, not on TuneConfig: rank
    results with them explicitly."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    sched = space.scheduler
    scheduler = ASHAScheduler(
        metric=METRIC,
        mode=MODE,
        time_attr="epoch",  # not training_iteration: that restarts at 1 after a restore
        max_t=sched.max_epochs,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ElasticLimiter(
                build_searcher(space, seed), capacity, resources_fn or cluster_resources
            ),
            scheduler=scheduler,
            num_samples=space.num_samples,
            max_concurrent_trials=None,  # the ElasticLimiter decides, from the live cluster
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            **progress.run_config_kwargs(space.searched(), sched.max_epochs, progress.columns(space)),
        ),
    )


def fit_or_resume(make_tuner: Callable[[], Any], experiment_dir: Path, trainable: Any, resume: bool) -> Any:
    """A new experiment, or (`resume`) the one in `experiment_dir` restored with its errored
    trials retried; the Train runs of unfinished trials resume from their latest checkpoints."""
    from ray import tune

    exists = tune.Tuner.can_restore(str(experiment_dir))
    if resume:
        if not exists:
            raise InputError(experiment_dir, "no experiment to resume here")
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
    else:
        if exists:
            raise InputError(
                experiment_dir, "experiment exists: pass --resume to finish it, or choose another --name"
            )
        tuner = make_tuner()
    return tuner.fit()


def run_search(opts: SearchOptions) -> SearchResult:
    """Search one fold, report, and optionally refit the top configs on every fold."""

    from geopose_ray.tune import refit, report

    start = time.monotonic()
    data_dir = resolve_data(opts)
    space = resolve_space(opts, data_dir)
    cluster, most = cluster_resources()
    resources = resolve_resources(opts, space, cluster, most)
    if opts.storage and "://" in opts.storage:  # reports, refits and the ensemble read files by path
        raise InputError(opts.storage, "cloud storage URIs are not supported: use a path shared by all nodes")
    storage = Path(opts.storage).resolve() if opts.storage else paths.default_storage()
    name = opts.name or space.name
    exp_dir = storage / name
    settings = DriverSettings(
        experiment=name,
        storage_path=str(storage),
        resources=resources,
        num_to_keep=opts.num_to_keep,
        max_failures=opts.max_failures,
        controller_failure_limit=FIXED_CLUSTER_CONTROLLER_RETRIES if opts.fixed_cluster else -1,
        train_fn=opts.train_fn,
    )
    capacity = resolve_capacity(opts, resources)
    trainable = make_trainable(settings)
    fit_or_resume(
        lambda: build_tuner(space, trainable, name, str(storage), capacity, opts.seed),
        exp_dir,
        trainable,
        opts.resume,
    )
    _write_options(exp_dir, opts, space, resources, capacity.limit(cluster, most))
    board = report.write_report(exp_dir, space)
    result = SearchResult(
        experiment_dir=exp_dir,
        leaderboard=board,
        best_config=report.best_config(board, report.load_trials(exp_dir)),
        trials=len(board),
        epochs_run=int(board["epochs_run"].sum()) if len(board) else 0,
        epochs_budget=len(board) * space.scheduler.max_epochs,
        wall_s=0.0,
    )
    result.interrupted = report.unfinished(board) > 0
    if result.interrupted:
        log.warning(
            "search interrupted: %d trials unfinished; finish with --resume", report.unfinished(board)
        )
    elif opts.refit_top > 0:
        folds = opts.folds if opts.folds is not None else (opts.fold,)  # reuses the search trials
        concurrent = capacity.limit(*cluster_resources())  # refits: fixed, from the cluster as it is now
        out = refit.run_refit(exp_dir, space, settings, opts.refit_top, folds, concurrent, opts.resume)
        result.members, result.members_path, result.refit_leaderboard = out
        result.interrupted = result.members_path is None
    result.wall_s = time.monotonic() - start
    return result


def _write_options(
    exp_dir: Path, opts: SearchOptions, space: SearchSpace, res: TrialResources, conc: int
) -> None:
    """The resolved settings beside the results (what exactly ran, for a later reader)."""
    doc = {k: v for k, v in dataclasses.asdict(opts).items() if k != "train_fn"}
    doc.update(
        space_file=str(Path(space.path).resolve()),
        resources=dataclasses.asdict(res),
        max_concurrent_trials=conc,
        max_epochs=space.scheduler.max_epochs,
        fixed=space.fixed,
    )
    atomic_write_text(exp_dir / OPTIONS_FILE, json.dumps(doc, indent=2, default=str) + "\n")
