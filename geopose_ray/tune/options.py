"""A search's options and what they resolve to, without Ray: `SearchOptions` (every flag of
`run_search.py`), the space with the run's settings and the data's derived defaults folded in,
the resources of one trial, the experiment and its Optuna study, and the checks a run (and a dry
run) makes before any Ray starts. `search.py` runs the search with them, `plan.py` prints them.

Kept Ray-free (and free of torch and timm at import) so that `run_search.py --dry-run` answers in
seconds: the model code (torch, timm) is imported only for a space with encoder weights, to look
them up in the cache (`cached_weights`, a dry run) or download them (`prepare_weights`, a run).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geopose_ray import paths, storage
from geopose_ray.data.stats import DataStats
from geopose_ray.errors import InputError
from geopose_ray.experiment import Experiment
from geopose_ray.tune import sampler
from geopose_ray.tune.capacity import Capacity, TrialResources, knows_every_need
from geopose_ray.tune.space import SearchSpace, load_space

log = logging.getLogger(__name__)
DEFAULT_WORKERS = 2
FIXED_CLUSTER_CONTROLLER_RETRIES = 5  # x 60 s worker-group start timeouts, then the trial errors
DEFAULT_CPUS_PER_WORKER = 1.0
POSTGRES_EXTRA = "pip install -c requirements.lock -e '.[postgres]'"


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
    folds: tuple[int, ...] | None = None  # refit folds; None: 1 or 2 after the search's (refit_plan.refit_folds)
    refit_top: int = 0
    refit_seeds: int = 1  # training seeds per refit config (refit.seed_replicas)
    refit_epochs: int | None = None  # epochs of each refit; None: the trials' budget (refit_plan.refit_epochs)
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
    weights_cache: str | None = None  # pretrained encoder weights; None: HF_HUB_CACHE, HF_HOME/hub, <home>/weights
    mlflow: str | None = None  # MLflow tracking URI: every trial logged as a run (MLflowLoggerCallback)
    sampler: str | None = None  # --sampler: a tune/sampler.py name; None: the space's `sampler:`, else auto


def weights_cache(opts: SearchOptions) -> Path:
    return Path(opts.weights_cache).resolve() if opts.weights_cache else paths.default_weights_cache()


def weight_candidates(space: SearchSpace) -> list[tuple[str, str]]:
    """(encoder, encoder_weights) of every weights value the space can sample, hub tags and local
    files alike ([] for none, or for a second stage: its init_checkpoint holds every weight).
    Only a non-empty list costs the models' import (torch, timm) to tell hub tags apart."""
    starts = space.values_of("init_checkpoint")
    if starts and all(starts):
        return []
    values = [w for w in space.values_of("encoder_weights") if w]
    return sorted({(e, str(w)) for e in space.values_of("encoder") for w in values})


def prepare_weights(opts: SearchOptions, space: SearchSpace) -> dict[tuple[str, str], Path]:
    """Download the pretrained weights of every (encoder, weights) the space can sample into the
    weights cache, once, before Ray starts: trials then only read local files. Then load each file,
    hub or local, into its encoder as the workers will (`weights.check_weights`), so that a file
    that would fail every trial on its worker stops the run here. Exit 2 (InputError) naming the
    encoder and the file when one is missing offline (with the command that fetches it) or does
    not load. {hub (encoder, tag): file}; {} for a space without encoder weights.
    `space`: `load_run_space(opts)`."""
    pairs = weight_candidates(space)
    if not pairs:
        return {}
    from geopose_ray.models import pretrained, weights

    hub = pretrained.ensure([(e, t) for e, t in pairs if pretrained.is_hub(t)], weights_cache(opts))
    local = {(e, w): Path(w) for e, w in pairs if not pretrained.is_hub(w)}
    for (encoder, _), path in {**hub, **local}.items():
        weights.check_weights(encoder, path)
    return hub


def cached_weights(opts: SearchOptions, space: SearchSpace) -> dict[tuple[str, str], Path | None]:
    """What `prepare_weights` would find in the cache, downloading nothing (a dry run): each hub
    (encoder, tag) -> its local file, or None when the run would download it. Offline and
    missing is an InputError, as in the run."""
    pairs = weight_candidates(space)
    if not pairs:
        return {}
    from geopose_ray.models import pretrained

    found: dict[tuple[str, str], Path | None] = {}
    for encoder, tag in (p for p in pairs if pretrained.is_hub(p[1])):
        pretrained.hub_repo(encoder, tag)  # an encoder without hub weights fails the run too: raise
        try:
            found[(encoder, tag)] = pretrained.resolve(encoder, tag, weights_cache(opts), download=False)
        except InputError:
            if pretrained.offline():
                raise
            found[(encoder, tag)] = None
    return found


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

    cache_dir = cache_dir_of(opts, data_dir)
    try:
        if cache.is_current(Path(data_dir), cache_dir):
            return stats.from_cache(cache.load_cache(cache_dir, "train"))
        return stats.from_files(data_dir)
    except ValueError as e:  # no train tile
        raise InputError(data_dir, str(e)) from None


def cache_dir_of(opts: SearchOptions, data_dir: str | Path) -> Path:
    return Path(opts.cache).resolve() if opts.cache else paths.default_cache_dir(data_dir)


def resolve_space(opts: SearchOptions, data_dir: str, data: DataStats | None = None) -> SearchSpace:
    """The space with this run's settings folded in: --set overrides, data, fold, the epoch
    budget, and (with `data`, the data set's statistics) the defaults derived from the data."""
    space = load_run_space(opts)
    given = space.scheduler  # the space's own budget, before the data scales it
    if data is not None:
        space = space.with_data(data)[0]
    sched = space.scheduler
    if opts.max_epochs is not None:  # every trial's budget, as given: not scaled to the crop
        if opts.max_epochs < 1:
            raise InputError("--max-epochs", f"must be >= 1, got {opts.max_epochs}")
        sched = dataclasses.replace(
            sched, max_epochs=opts.max_epochs, grace_period=min(given.grace_period, opts.max_epochs)
        )
    run = {
        "data_dir": data_dir,
        "fold": opts.fold,
        "weights_cache": str(weights_cache(opts)),
        **({"cache_dir": str(Path(opts.cache).resolve())} if opts.cache else {}),
    }
    if "seed" not in space.fixed and "seed" not in space.searched():
        run["seed"] = opts.seed  # the training seed of every trial (Optuna's is the same --seed)
    # every rung of ASHA (a multiple of its grace period) compares whole-tile statistics; a run
    # key, like the fold: the scheduler decides it, not the space
    run["precise_bn_every"] = sched.grace_period if sched.grace_period < sched.max_epochs else 0
    run.update(validation_spacing(dataclasses.replace(space, scheduler=sched)))
    n_folds = space.n_folds()
    if not 0 <= opts.fold < n_folds:
        raise InputError(space.path, f"--fold {opts.fold} is not in 0..{n_folds - 1} (n_folds {n_folds})")
    return dataclasses.replace(
        space,
        fixed={**space.fixed, **run},
        scheduler=sched,
        num_samples=opts.num_samples or space.num_samples,
    )


def validation_spacing(space: SearchSpace) -> dict[str, int]:
    """{"val_every": ASHA's grace period} for a space with rungs before its last epoch, or {}.
    A validation only where something reads it: the rungs and the signal gate read the
    re-measured epochs alone (multiples of the grace period, and the last), and the others cost
    30-60 % of a trial (docs/BENCHMARKS.md, 'Validations that nobody reads'). A space's own value
    wins, and a plateau schedule, which steps on every epoch's score, validates every epoch."""
    sched = space.scheduler
    if sched.grace_period >= sched.max_epochs or "val_every" in space.fixed:
        return {}
    return {} if "plateau" in space.values_of("schedule") else {"val_every": sched.grace_period}


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


def resolve_sampler(opts: SearchOptions, space: SearchSpace, limit: int) -> sampler.SamplerChoice:
    """The search's Optuna sampler (`sampler.resolve`): --sampler, else the space's, else auto for
    the run's trials. `limit`: trials at once now; on a cluster that may grow (not
    `fixed_cluster`) more may run later, so the sampler is set up for several unless
    --max-concurrent is 1. An unknown name is an InputError naming the flag or the file."""
    at_once = limit if opts.fixed_cluster else (opts.max_concurrent or max(limit, 2))
    trials = opts.num_samples or space.num_samples
    return sampler.resolve(opts.sampler, space.sampler, space.path, trials, at_once)


def check_sampler(opts: SearchOptions, space: SearchSpace) -> sampler.SamplerChoice:
    """The sampler's name (flag or space) is known and the packages it needs are installed
    (GPSampler: torch and scipy), before Ray starts. Returns the choice for one trial at once."""
    choice = resolve_sampler(dataclasses.replace(opts, fixed_cluster=True), space, 1)
    missing = sampler.missing_packages(choice)
    if missing:
        where = "--sampler" if opts.sampler is not None else space.path
        raise InputError(where, f"the {choice.name} sampler needs {', '.join(missing)}: pip install {' '.join(missing)}")
    return choice


def check_mlflow(opts: SearchOptions) -> None:
    """--mlflow needs the optional `mlflow` package: without it, exit 2 with one line before Ray
    starts. Found, not imported (seconds saved: a dry run checks it too)."""
    if opts.mlflow is not None and importlib.util.find_spec("mlflow") is None:
        raise InputError("--mlflow", "needs the mlflow package: pip install mlflow")


def check_optuna_storage(opts: SearchOptions) -> None:
    """--optuna-storage is a database URL whose driver is installed (PostgreSQL's psycopg2 is an
    extra): checked, not connected to, before Ray starts; the error line masks the password."""
    if opts.optuna_storage is None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(opts.optuna_storage)
        url.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise InputError("--optuna-storage", f"not a database URL SQLAlchemy knows ({e})") from None
    except ImportError as e:
        problem = f"needs the {e.name or 'database'} package, SQLAlchemy's driver for {url.drivername}://"
        if url.get_backend_name() == "postgresql":  # SQLAlchemy 2.1's default driver is psycopg (3)
            problem += f"; the [postgres] extra ({POSTGRES_EXTRA}) installs psycopg2: postgresql+psycopg2://"
        raise InputError("--optuna-storage", problem) from None


def check_storage(opts: SearchOptions) -> None:
    """A local --storage (or the default) can be created and written: its nearest existing folder
    is writable. A URI was opened by `storage.normalize` already (bucket); here it is reached once
    (credentials, endpoint), in seconds."""
    root = opts.storage or str(paths.default_storage())
    if storage.is_remote(root):
        storage.probe(root)
        return
    existing = Path(root).resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(root, f"cannot write experiments here ({existing} is not a writable folder)")


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


def optuna_study(opts: SearchOptions, exp: Experiment, fingerprint: str | None = None) -> tuple[str, str]:
    """(storage URL, study name) of the search's Optuna study. In a shared --optuna-storage
    database the name carries the experiment's fingerprint (`identity.py`), so two experiments
    of one --name on other data, space or folds never share a study; the default SQLite file
    lives in the experiment's own folder and keeps the plain name."""
    if opts.optuna_storage is None:
        return exp.optuna_url, exp.name
    return opts.optuna_storage, f"{exp.name}-{fingerprint[:8]}" if fingerprint else exp.name


def parse_folds(spec: str) -> tuple[int, ...]:
    """`--folds`: a comma list ("0,1,3") or a count ("2" = folds 0 and 1)."""
    try:
        if "," in spec:
            folds = tuple(int(f) for f in spec.split(",") if f.strip())
        else:
            folds = tuple(range(int(spec)))
    except ValueError:
        raise InputError("--folds", f"expected a count or a comma list of folds, not {spec!r}") from None
    if not folds or min(folds) < 0 or len(set(folds)) != len(folds):
        raise InputError("--folds", f"need distinct folds >= 0, got {spec!r}")
    return folds
