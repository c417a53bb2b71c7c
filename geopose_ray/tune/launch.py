"""A search as `run_search.py` (and the `geopose-search` command) runs it: its flags in groups, as
`SearchOptions`; every check that needs no Ray (the space, --set, the flags, the hub weights, the
data set, the Optuna database) before Ray starts, so a bad input fails in seconds with one line;
then the plan (--dry-run) or the search (`search.py`), and its result printed.

A dry run is dry: it downloads, converts and writes nothing, and starts no Ray unless --address
(or RAY_ADDRESS) names a cluster to read; a local plan reads this machine's CPUs and GPUs instead
(`capacity.local_cluster`). `ray` is imported only on those paths, so --help and a local plan
answer in seconds.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from geopose_ray import storage
from geopose_ray.errors import EXIT_CODES, EXIT_FAILURE, EXIT_OK, HelpFormatter, run_cli
from geopose_ray.redact import mask_url
from geopose_ray.tune.capacity import LOCAL, local_cluster, resolve_address
from geopose_ray.tune.options import SearchOptions, load_run_space, parse_folds, prepare_weights
from geopose_ray.tune.plan import check_search, plan_search
from geopose_ray.tune.space import parse_overrides

if TYPE_CHECKING:
    from geopose_ray.tune.search import SearchResult

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPACE = REPO / "search_spaces" / "smoke.yaml"
DESCRIPTION = """Hyperparameter search: Ray Tune + Optuna + ASHA over Ray Train runs, then fold refits.

    python run_search.py                       # embedded default: synthetic set, smoke.yaml, CPU
    python run_search.py --dry-run             # the plan and a rough wall time, in seconds, no Ray
    python run_search.py --data DIR --space search_spaces/architectures.yaml --refit-top 3 --folds 0,1
    python run_search.py --data DIR --storage s3://BUCKET/PREFIX --mlflow http://MLFLOW:5000
    python run_search.py --sampler tpe --num-samples 24   # a model-based sampler instead of auto

With no arguments: generates the synthetic set when missing, searches `search_spaces/smoke.yaml`
on CPU, then trains its best config on the two folds after the search's (folds that did not
choose it), in minutes on a 2-core laptop (README.md has the measured time). Then `python
run_ensemble.py` blends them into a submission. `geopose-search` is the same command.
"""
EPILOG = textwrap.fill(
    f"{EXIT_CODES}. A search whose trials did not all finish (stopped by Ctrl-C, a lost driver or "
    "node) returns 1: run the same command with --resume to finish it. Passwords and tokens in "
    "--optuna-storage, --mlflow and --storage URLs are used to connect and masked (***) in every "
    "file, line and log the search writes.",
    width=100,
    break_on_hyphens=False,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    _data_args(p.add_argument_group("data"))
    _search_args(p.add_argument_group("search"))
    _resources_args(p.add_argument_group("resources"))
    _storage_args(p.add_argument_group("storage"))
    _tracking_args(p.add_argument_group("tracking and console"))
    return p


def _data_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--data", help="DrivenData-layout folder (default: the embedded synthetic set)")
    g.add_argument("--cache", help="conversion cache (default: <data>/.geopose_cache)")
    g.add_argument("--fold", type=int, default=0, help="validation fold of the search")
    g.add_argument("--folds", help="refit folds: a count or a comma list (default: the one or two folds after --fold "
                   "that show 5 places of every city, so the out-of-fold scores that choose members and fit the "
                   "blend did not choose the configs; the search's full-budget trials on --fold join as members "
                   "for the test tiles only)")  # fmt: skip


def _search_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--space", default=str(DEFAULT_SPACE), help="search-space YAML")
    g.add_argument("--name", help="experiment name (default: the space file's name)")
    g.add_argument("--num-samples", type=int, help="trials (default: the space's num_samples)")
    g.add_argument("--max-epochs", type=int, help="every trial's budget, as given (default: the "
                   "space's scheduler.max_epochs scaled to the derived crop, as the plan prints)")  # fmt: skip
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a Config key the "
                   "space does not search, e.g. --set init_checkpoint=DIR (repeatable; VALUE is YAML)")  # fmt: skip
    g.add_argument("--sampler", metavar="{auto,random,tpe,gp}", help="Optuna's sampler (default: the space's "
                   "`sampler:`, else auto: random search at every budget where the bench has not shown a "
                   "model-based sampler beating it, docs/SEARCH_VALUE.md); wins over the space")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seeds Optuna's sampler and every trial's training "
                   "(unless the space fixes or searches `seed`)")  # fmt: skip
    g.add_argument("--refit-top", type=int, help="refit the K best configs on every fold (default: 1 with no "
                   "--space, else 0)")  # fmt: skip
    g.add_argument("--refit-seeds", type=int, help="train each refit config with N seeds on each "
                   "fold, N members per fold (default: 1)")  # fmt: skip
    g.add_argument("--refit-epochs", type=int, help="train each refit for N epochs (default: the "
                   "trials' budget, whose full-budget trials are then members too)")  # fmt: skip
    g.add_argument("--resume", action="store_true", help="finish the interrupted experiment --name (refused "
                   "when its data, space, --set, folds or derived defaults differ: its fingerprint)")  # fmt: skip
    g.add_argument("--dry-run", action="store_true", help="check the data, space, resources, weights and "
                   "storage, print the plan with a rough wall time, and stop: downloads, converts and "
                   "writes nothing, starts no Ray unless --address names a cluster")  # fmt: skip


def _resources_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
    g.add_argument("--workers-per-trial", type=int, help="Train workers per trial (default: hint, else 2)")
    g.add_argument("--gpus-per-worker", type=float, help="default: 1 if the cluster has GPUs, else 0")
    g.add_argument("--cpus-per-worker", type=float, help="default: space hint, else 1")
    g.add_argument("--max-concurrent", type=int, help="cap on trials at once (default: as many as the cluster "
                   "fits, re-read while the search runs)")  # fmt: skip
    g.add_argument("--pending-trials", type=int, help="trials admitted beyond what fits, so an autoscaler adds "
                   "nodes (default: 0 on a local instance, 1 with --address)")  # fmt: skip
    g.add_argument("--max-failures", type=int, default=1, help="Train restarts per trial after a crash")


def _storage_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--storage", help="experiments: a folder, or a URI s3://BUCKET/PREFIX or gs://... read and "
                   "written through pyarrow (default: runs/experiments)")  # fmt: skip
    g.add_argument("--local-cache", help="local mirror of a remote --storage: report files, the default "
                   "Optuna SQLite file (default: runs/cache/<bucket>/<prefix>)")  # fmt: skip
    g.add_argument("--optuna-storage", metavar="URL", help="the Optuna study's database, named after the "
                   "experiment (default: sqlite:///<storage>/<name>/optuna.db, in the local cache when "
                   "--storage is a URI; on a cluster a PostgreSQL URL, where the study is named "
                   "<name>-<fingerprint>); --resume continues the same study")  # fmt: skip
    g.add_argument("--weights-cache", help="pretrained encoder weights (the hub's cache layout), downloaded "
                   "once before the trials; on a cluster a shared folder (default: $HF_HUB_CACHE, else "
                   "$HF_HOME/hub, else runs/weights)")  # fmt: skip


def _tracking_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--mlflow", metavar="URI", help="log every trial as an MLflow run (experiment = --name) "
                   "to this tracking URI, e.g. http://HOST:5000 or sqlite:///mlflow.db (needs mlflow)")  # fmt: skip
    g.add_argument("--verbose", action="store_true", help="Ray's full console: every worker's output")


def options_from_args(args: argparse.Namespace, embedded: bool) -> SearchOptions:
    """`run_search.py`'s flags as SearchOptions; a bad --storage URI, --folds or --set raises
    InputError here. `embedded`: the run searches the embedded default space, whose refit
    defaults differ (its best config refit on the refit folds: a ready ensemble)."""
    return SearchOptions(
        space=args.space,
        data=args.data,
        cache=args.cache,
        storage=str(storage.normalize(args.storage)) if args.storage else None,
        local_cache=args.local_cache,
        name=args.name,
        num_samples=args.num_samples,
        workers_per_trial=args.workers_per_trial,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        fold=args.fold,
        folds=parse_folds(args.folds) if args.folds else None,
        refit_top=args.refit_top if args.refit_top is not None else (1 if embedded else 0),
        refit_seeds=args.refit_seeds if args.refit_seeds is not None else 1,
        refit_epochs=args.refit_epochs,
        resume=args.resume,
        seed=args.seed,
        max_epochs=args.max_epochs,
        max_failures=args.max_failures,
        fixed_cluster=resolve_address(args.address) == LOCAL,
        overrides=parse_overrides(args.set),
        max_concurrent=args.max_concurrent,
        pending_trials=args.pending_trials,
        optuna_storage=args.optuna_storage,
        weights_cache=args.weights_cache,
        mlflow=args.mlflow,
        sampler=args.sampler,
    )


def check_before_ray(opts: SearchOptions) -> None:
    """What a search checks without Ray (`plan.check_search`), then the hub weights, downloaded
    once here (or InputError naming the missing file)."""
    check_search(opts)
    prepare_weights(opts, load_run_space(opts))


def dry_run(opts: SearchOptions, address: str | None, verbose: bool = False) -> list[str]:
    """The plan: on this machine's CPUs and GPUs without Ray, or on the cluster --address names
    (joined only once every check has passed)."""
    if resolve_address(address) == LOCAL:
        return plan_search(opts, local_cluster(), "this machine, read without starting Ray")
    check_search(opts)
    from geopose_ray import ray_env

    ray_env.init(address, verbose=verbose)
    try:
        return plan_search(opts, ray_env.cluster_resources(), "the joined cluster")
    finally:
        ray_env.shutdown()


def search_from_args(args: argparse.Namespace, embedded: bool) -> SearchResult | None:
    """Everything `run_search.py` does after parsing: the plan (--dry-run: returns None), or the
    checks, Ray up, the search and its printed result; Ray is shut down whatever happens."""
    opts = options_from_args(args, embedded)
    if args.dry_run:
        print(*dry_run(opts, args.address, args.verbose), sep="\n")
        return None
    check_before_ray(opts)
    from geopose_ray import ray_env
    from geopose_ray.tune.search import run_search

    ray_env.init(args.address, verbose=args.verbose)
    try:
        result = run_search(opts)
    finally:
        ray_env.shutdown()
    print_result(result)
    return result


def print_result(res: SearchResult) -> None:
    """The leaderboard, where the experiment is, the epochs ASHA saved, the members, the time."""
    from geopose_ray.tune.report import format_table

    print(format_table(res.leaderboard))
    print(f"\nexperiment: {mask_url(res.location)}")
    if res.location != str(res.experiment_dir):
        print(f"report (local copy): {res.experiment_dir}")
    print(f"trials: {res.trials}  epochs run: {res.epochs_run} of a full budget of {res.epochs_budget}")
    if res.after_signal:
        print(
            f"learning signal: from epoch {res.signal_epoch}, where ASHA began to compare the trials"
            if res.signal_epoch is not None
            else "learning signal: none (no trial learned every target), so ASHA cut nothing"
        )
    if res.members_path is not None:
        print(f"refit members: {len(res.members)} -> {res.members_path}")
    print(f"wall time: {res.wall_s:.0f} s")
    if res.interrupted:
        print("interrupted: run the same command with --resume to finish", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`run_search.py` / `geopose-search`: 0 done (or planned), 1 trials left unfinished."""
    args = build_parser().parse_args(argv)
    embedded = Path(args.space).resolve() == DEFAULT_SPACE.resolve()
    result = search_from_args(args, embedded)  # bad input: InputError, exit 2 (run_cli)
    return EXIT_FAILURE if result is not None and result.interrupted else EXIT_OK


def cli() -> None:
    """The `geopose-search` console script (pyproject.toml's [project.scripts])."""
    run_cli(main)
