"""A search as `run_search.py` runs it: its flags as `SearchOptions`, every check that needs no
Ray (the space, --set, the flags, the hub weights, the data set) before Ray starts, so a bad
input fails in seconds with one line; then the plan (--dry-run) or the search (`search.py`), and
its result printed. The script only parses its flags and turns the result into an exit code.
"""

from __future__ import annotations

import argparse
import sys

from geopose_ray import ray_env, storage
from geopose_ray.tune.refit import parse_folds
from geopose_ray.tune.search import (
    SearchOptions,
    SearchResult,
    check_capacity_options,
    check_mlflow,
    load_run_space,
    plan_search,
    prepare_weights,
    run_search,
)
from geopose_ray.tune.space import parse_overrides


def options_from_args(args: argparse.Namespace, embedded: bool) -> SearchOptions:
    """`run_search.py`'s flags as SearchOptions; a bad --storage URI, --folds or --set raises
    InputError here. `embedded`: the run searches the embedded default space, whose refit
    defaults differ (its best config refit with a second seed: a ready ensemble)."""
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
        refit_seeds=args.refit_seeds if args.refit_seeds is not None else (2 if embedded else 1),
        refit_epochs=args.refit_epochs,
        resume=args.resume,
        seed=args.seed,
        max_epochs=args.max_epochs,
        max_failures=args.max_failures,
        fixed_cluster=ray_env.resolve_address(args.address) == ray_env.LOCAL,
        overrides=parse_overrides(args.set),
        max_concurrent=args.max_concurrent,
        pending_trials=args.pending_trials,
        optuna_storage=args.optuna_storage,
        weights_cache=args.weights_cache,
        mlflow=args.mlflow,
    )


def check_before_ray(opts: SearchOptions) -> None:
    """What a search checks without Ray, in the order a user fixes it: the space with its --set
    values and the flags, the optional mlflow package, the hub weights (downloaded once here, or
    InputError naming the missing file) and a given data set (the embedded one is generated
    valid)."""
    space = load_run_space(opts)
    check_capacity_options(opts)
    check_mlflow(opts)
    prepare_weights(opts, space)
    if opts.data:
        from geopose_ray.data.cache import validate_unless_cached

        validate_unless_cached(opts.data, opts.cache)


def search_from_args(args: argparse.Namespace, embedded: bool) -> SearchResult | None:
    """Everything `run_search.py` does after parsing: checks, Ray up, the plan (--dry-run: returns
    None) or the search and its printed result; Ray is shut down whatever happens."""
    opts = options_from_args(args, embedded)
    check_before_ray(opts)
    ray_env.init(args.address, verbose=args.verbose)
    try:
        if args.dry_run:
            print(*plan_search(opts), sep="\n")
            return None
        result = run_search(opts)
    finally:
        ray_env.shutdown()
    print_result(result)
    return result


def print_result(res: SearchResult) -> None:
    """The leaderboard, where the experiment is, the epochs ASHA saved, the members, the time."""
    from geopose_ray.tune.report import format_table

    print(format_table(res.leaderboard))
    print(f"\nexperiment: {res.location}")
    if res.location != str(res.experiment_dir):
        print(f"report (local copy): {res.experiment_dir}")
    print(f"trials: {res.trials}  epochs run: {res.epochs_run} of a full budget of {res.epochs_budget}")
    if res.members_path is not None:
        print(f"refit members: {len(res.members)} -> {res.members_path}")
    print(f"wall time: {res.wall_s:.0f} s")
    if res.interrupted:
        print("interrupted: run the same command with --resume to finish", file=sys.stderr)
