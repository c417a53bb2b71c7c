"""A search, start to end: resolve the options against the space, the data and the cluster; run
the search Tuner (`tuner.py`: OptunaSearch + ASHA over Ray Train runs, `trainer.py`); write the
report; refit the best configs (`refit.py`). No `ray` import here.

Needs a connected Ray (`ray_env.init`): the CLI `run_search.py` does that.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from geopose_ray import paths, ray_env, storage
from geopose_ray.atomic import atomic_write_text
from geopose_ray.convert import ensure_cache
from geopose_ray.data.stats import DataStats
from geopose_ray.errors import InputError
from geopose_ray.experiment import MEMBERS, OPTIONS, OPTUNA_DB, REPORT_FILES, Experiment
from geopose_ray.models import pretrained
from geopose_ray.tune import refit, report, trainer, tuner
from geopose_ray.tune.capacity import Capacity, TrialResources, knows_every_need
from geopose_ray.tune.space import SearchSpace, load_space

log = logging.getLogger(__name__)
DEFAULT_WORKERS = 2
FOLDS_VERSION = 2  # 1: city folds by default, one place's tiles in several folds; 2: place folds
FIXED_CLUSTER_CONTROLLER_RETRIES = 5  # x 60 s worker-group start timeouts, then the trial errors
DEFAULT_CPUS_PER_WORKER = 1.0


@dataclass
class SearchOptions:
    """Everything `run_search.py` accepts (None = from the space's hints, then the defaults)."""

    space: str
    data: str | None = None  # None: the embedded synthetic set (generated when missing)
    cache: str | None = None
    storage: str | None = None  # a folder or a URI (s3://bucket/prefix, gs://...); None: paths.default_storage()
    local_cache: str | None = None  # local mirror of a remote storage; None: paths.storage_cache()
    name: str | None = None  # None: the space file's stem
    num_samples: int | None = None
    workers_per_trial: int | None = None
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None
    fold: int = 0
    folds: tuple[int, ...] | None = None  # refit folds; None: the search fold (its trials are reused)
    refit_top: int = 0
    refit_seeds: int = 1  # training seeds per refit config (refit.seed_replicas)
    refit_epochs: int | None = None  # epochs of each refit; None: the space's max_epochs (refit.with_epochs)
    resume: bool = False
    seed: int = 0
    max_epochs: int | None = None
    num_to_keep: int = 2  # best Train checkpoints kept per trial (plus the latest)
    max_failures: int = 1  # Train worker-group restarts per trial
    fixed_cluster: bool = True  # a cluster that cannot grow (ray.init(address="local")): refuse misfits
    overrides: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE: more fixed settings
    max_concurrent: int | None = None  # cap on trials at once; None: as many as the cluster fits
    pending_trials: int | None = None  # admitted beyond what fits (autoscaler demand); None: 0 fixed, else 1
    optuna_storage: str | None = None  # the study's database URL; None: SQLite in the experiment folder
    weights_cache: str | None = None  # pretrained encoder weights; None: <home>/weights
    mlflow: str | None = None  # MLflow tracking URI: every trial logged as a run (MLflowLoggerCallback)


@dataclass
class SearchResult:
    experiment_dir: Path  # the local folder holding the report (a mirror when the storage is remote)
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
    location: str = ""  # the experiment in its storage: a local path or a URI


def weights_cache(opts: SearchOptions) -> Path:
    return Path(opts.weights_cache).resolve() if opts.weights_cache else pretrained.default_cache()


def prepare_weights(opts: SearchOptions, space: SearchSpace) -> dict[tuple[str, str], Path]:
    """Download the pretrained weights of every (encoder, weights) the space can sample into the
    weights cache, once, before Ray starts: trials then only read local files. Exit 2 (InputError)
    naming the encoder and the file when offline and missing. {} for a space without hub weights.
    `space`: `load_run_space(opts)`."""
    starts = space.values_of("init_checkpoint")
    if starts and all(starts):  # a second stage: the checkpoint holds every weight
        return {}
    tags = [w for w in space.values_of("encoder_weights") if pretrained.is_hub(w)]
    return pretrained.ensure([(e, t) for e in space.values_of("encoder") for t in tags], weights_cache(opts))


def load_run_space(opts: SearchOptions) -> SearchSpace:
    """The space file with --set overrides; a named init_checkpoint must exist here (else every
    trial would fail on its worker). Needs no Ray: the CLI calls it before starting one."""
    space = load_space(opts.space).with_fixed(opts.overrides)
    init = space.fixed.get("init_checkpoint")
    if init:
        from geopose_ray.checkpoint import check_init_checkpoint

        check_init_checkpoint(init, space.defaults())
    return space


def measure_data(opts: SearchOptions, data_dir: str | Path) -> DataStats:
    """The data set's statistics: from its cache when current (every tile, measured at
    conversion), else from a sample of its AGL files (a dry run converts nothing)."""
    from geopose_ray.data import cache, stats

    cache_dir = Path(opts.cache).resolve() if opts.cache else paths.default_cache_dir(data_dir)
    try:
        if cache.is_current(Path(data_dir), cache_dir):
            return stats.from_cache(cache.load_cache(cache_dir, "train"))
        return stats.from_files(data_dir)
    except ValueError as e:  # no train tile
        raise InputError(data_dir, str(e)) from None


def resolve_space(opts: SearchOptions, data_dir: str, data: DataStats | None = None) -> SearchSpace:
    """The space with this run's settings folded in: --set overrides, data, fold, the epoch
    budget, and (with `data`, the data set's statistics) the defaults derived from the data."""
    space = load_run_space(opts)
    if data is not None:
        space = space.with_data(data)[0]
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
        "weights_cache": str(weights_cache(opts)),
        **({"cache_dir": str(Path(opts.cache).resolve())} if opts.cache else {}),
    }
    if "seed" not in space.fixed and "seed" not in space.searched():
        run["seed"] = opts.seed  # the training seed of every trial (Optuna's is the same --seed)
    n_folds = space.n_folds()
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


def check_capacity_options(opts: SearchOptions) -> None:
    """--pending-trials >= 0, --max-concurrent >= 1, --refit-seeds and --refit-epochs >= 1
    (checked before Ray starts)."""
    if opts.pending_trials is not None and opts.pending_trials < 0:
        raise InputError("--pending-trials", f"must be >= 0, got {opts.pending_trials}")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise InputError("--max-concurrent", f"must be >= 1, got {opts.max_concurrent}")
    if opts.refit_seeds < 1:
        raise InputError("--refit-seeds", f"must be >= 1, got {opts.refit_seeds}")
    if opts.refit_epochs is not None and opts.refit_epochs < 1:
        raise InputError("--refit-epochs", f"must be >= 1, got {opts.refit_epochs}")


def check_mlflow(opts: SearchOptions) -> None:
    """--mlflow needs the optional `mlflow` package (imported only then): without it, exit 2 with
    one line before Ray starts."""
    if opts.mlflow is None:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise InputError("--mlflow", "needs the mlflow package: pip install mlflow") from None


def resolve_capacity(opts: SearchOptions, resources: TrialResources) -> Capacity:
    """A fixed local instance admits only what fits; a joined cluster without an autoscaler config
    keeps one trial pending by default (see `geopose_ray.tune.capacity`)."""
    check_capacity_options(opts)
    pending = opts.pending_trials if opts.pending_trials is not None else (0 if opts.fixed_cluster else 1)
    return Capacity(resources, pending=pending, cap=opts.max_concurrent)


def resolve_data(opts: SearchOptions) -> str:
    if opts.data is None:
        from geopose_ray.synthetic import ensure_default

        return str(ensure_default(paths.default_data_dir()))
    data = Path(opts.data).resolve()
    if not data.is_dir():
        raise InputError(data, "data folder not found")
    return str(data)


def resolve_experiment(opts: SearchOptions, space: SearchSpace) -> Experiment:
    """--storage (a local folder or a URI) / --name, else runs/experiments / the space's name.
    A URI pyarrow cannot open is refused with exit 2."""
    root = storage.normalize(opts.storage) if opts.storage else paths.default_storage()
    cache = Path(opts.local_cache).resolve() if opts.local_cache else None
    return Experiment(root, opts.name or space.name, cache)


def optuna_study(opts: SearchOptions, exp: Experiment) -> tuple[str, str]:
    """(storage URL, study name) of the search's Optuna study."""
    return opts.optuna_storage or exp.optuna_url, exp.name


def folds_record(space: SearchSpace) -> dict[str, Any]:
    """The fold settings every trial, refit and blend of the experiment shares, with the version
    of their meaning: an experiment is resumed only with the folds it started with."""
    from geopose_ray.config import Config

    d = Config.from_dict(space.defaults(), strict=False).data
    return {"version": FOLDS_VERSION, "mode": d.fold_mode, "n_folds": d.n_folds, "fold_seed": d.fold_seed}


def check_resumable(exp: Experiment, space: SearchSpace) -> None:
    """A resumed experiment must have started with these folds: trials split another way would
    be ranked, refit and blended as if they had seen the same tiles. One that started before
    place folds (no record) or with other fold settings stops with one line (exit 2)."""
    local = exp.fetch(OPTIONS)
    stored = json.loads(local.read_text()).get("folds") if local is not None else None
    if stored != folds_record(space):
        problem = "made before leak-free place folds" if stored is None else f"made with folds {stored}"
        raise InputError(exp.location, f"{problem}, not {folds_record(space)}: start a new --name")


def refit_folds(opts: SearchOptions, n_folds: int) -> tuple[int, ...]:
    """--folds, else the one fold after the search's own. The search chose its configs by their
    scores on its fold's tiles, so members refit there would predict those same tiles out of
    fold, and the blend and the member choice fitted on them would inherit that selection's
    optimism. On another fold, the out-of-fold tiles never took part in choosing."""
    return opts.folds if opts.folds is not None else ((opts.fold + 1) % n_folds,)


def selection_note(opts: SearchOptions, n_folds: int) -> str:
    """How the refit folds' out-of-fold scores may be read: a person sees it in the plan."""
    if opts.fold in refit_folds(opts, n_folds):
        return f"includes the search's fold {opts.fold}: its out-of-fold scores are optimistic"
    return f"not the search's fold {opts.fold}: out-of-fold scores free of the selection"


def plan_search(opts: SearchOptions) -> list[str]:
    """What `run_search(opts)` would do, as lines a person reads (`run_search.py --dry-run`): the
    data, the space, the resources per trial and how many trials fit the connected cluster, the
    experiment folder and the refits. Checks everything a run checks; trains nothing."""
    from geopose_ray.data import layout

    data = Path(opts.data).resolve() if opts.data else paths.default_data_dir()
    tiles = {split: len(layout.load_split(data, split)) for split in ("train", "test")} if opts.data else None
    measured = measure_data(opts, data) if layout.has_split(data, "train") else None
    space = resolve_space(opts, str(data), measured)
    cluster, most = ray_env.cluster_resources()
    resources = resolve_resources(opts, space, cluster, most)
    concurrent = resolve_capacity(opts, resources).limit(cluster, most)
    exp = resolve_experiment(opts, space)
    sched = space.scheduler
    have = {k: cluster.get(k, 0.0) for k in ("CPU", "GPU")}
    lines = [
        f"data:       {data}  "
        + (f"({tiles['train']} train / {tiles['test']} test tiles)" if tiles else "(the embedded synthetic set)"),
        f"space:      {space.path}  searched: {', '.join(space.searched()) or '-'}",
        f"trials:     {space.num_samples} x up to {sched.max_epochs} epochs on fold {opts.fold}; "
        f"ASHA grace {sched.grace_period}, reduction factor {sched.reduction_factor}",
        f"per trial:  {resources.workers_per_trial} Train worker(s) x {resources.per_worker()}",
        f"cluster:    {have}; {concurrent} trial(s) at once",
        f"experiment: {exp.location}" + ("  (resumed)" if opts.resume else ""),
        "optuna:     {}  (study {})".format(*optuna_study(opts, exp)),
        *_data_lines(opts, measured),
    ]
    if opts.refit_top > 0:
        seeds = f" x {opts.refit_seeds} seeds" if opts.refit_seeds > 1 else ""
        seeds += f", {opts.refit_epochs} epochs" if opts.refit_epochs else ""
        folds = refit_folds(opts, space.n_folds())
        lines.append(
            f"refits:     the top {opts.refit_top} configs{seeds} on fold(s) {list(folds)}"
            f" ({selection_note(opts, space.n_folds())}) -> {exp.file(MEMBERS)}"
        )
    return lines


def _data_lines(opts: SearchOptions, measured: DataStats | None) -> list[str]:
    """The plan's measured statistics and the values derived from them, each with its reason."""
    if measured is None:
        return ["derived:    measured once the embedded set is written (the first run writes it)"]
    lines = [f"measured:   {line}" for line in measured.lines()]
    return lines + [f"derived:    {line}" for line in load_run_space(opts).with_data(measured)[1]]


def run_search(opts: SearchOptions, train_fn: trainer.WorkerFn | None = None) -> SearchResult:
    """Search one fold, report, and optionally refit the top configs on every fold. `train_fn`:
    another per-worker function (see `trainer.build_trainer`)."""
    start = time.monotonic()
    data_dir = resolve_data(opts)
    ensure_cache(data_dir, opts.cache, map_fn=ray_env.task_map)  # the driver converts; trials only read
    space = resolve_space(opts, data_dir, measure_data(opts, data_dir))
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
    study = optuna_study(opts, exp)
    exp.dir.mkdir(parents=True, exist_ok=True)  # SQLite creates its file, not the folder
    if opts.resume:
        check_resumable(exp, space)
    if opts.resume and opts.optuna_storage is None:
        exp.fetch(OPTUNA_DB)  # resumed on another machine: the study's copy from the storage

    def make_tuner() -> Any:  # a new experiment only: its options (with its folds) before any trial
        _write_options(exp, opts, space, resources, capacity.limit(cluster, most))
        exp.push(OPTIONS)
        return tuner.build_tuner(
            space, trainable, exp.name, str(exp.storage), capacity, opts.seed, study=study, mlflow=opts.mlflow
        )

    tuner.fit_or_resume(make_tuner, exp.location, trainable, opts.resume)
    _write_options(exp, opts, space, resources, capacity.limit(cluster, most))
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
    )
    result.interrupted = report.unfinished(board) > 0
    if result.interrupted:
        log.warning(
            "search interrupted: %d trials unfinished; finish with --resume", report.unfinished(board)
        )
    elif opts.refit_top > 0:
        folds = refit_folds(opts, space.n_folds())
        concurrent = capacity.limit(*ray_env.cluster_resources())  # refits: fixed, from the cluster now
        out = refit.run_refit(
            exp, space, settings, opts.refit_top, folds, concurrent, opts.resume, train_fn,
            opts.refit_seeds, opts.refit_epochs,
        )  # fmt: skip
        result.members, result.members_path, result.refit_leaderboard = out
        result.interrupted = result.members_path is None
    result.wall_s = time.monotonic() - start
    return result


def _write_options(exp: Experiment, opts: SearchOptions, space: SearchSpace, res: TrialResources, conc: int) -> None:
    """The resolved settings beside the results (what exactly ran, for a later reader)."""
    doc = dataclasses.asdict(opts)
    doc.update(
        space_file=str(Path(space.path).resolve()),
        resources=dataclasses.asdict(res),
        max_concurrent_trials=conc,
        max_epochs=space.scheduler.max_epochs,
        fixed=space.fixed,
        folds=folds_record(space),
    )
    atomic_write_text(exp.options, json.dumps(doc, indent=2, default=str) + "\n")
