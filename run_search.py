"""Hyperparameter search: Ray Tune + Optuna + ASHA over Ray Train runs, then fold refits.

    python run_search.py                       # embedded default: synthetic set, smoke.yaml, CPU
    python run_search.py --data DIR --space search_spaces/architectures.yaml --refit-top 3 --folds 0,1
    python run_search.py --data DIR --storage s3://BUCKET/PREFIX --mlflow http://MLFLOW:5000

With no arguments: generates the synthetic set when missing, searches `search_spaces/smoke.yaml`
on CPU, then trains its best config again with a second seed (the best trial is reused as the
first), in minutes on a 2-core laptop (README.md has the measured time). Then `python run_ensemble.py` blends them into a submission.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from geopose_ray.errors import HelpFormatter, run_cli

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", help="DrivenData-layout folder (default: the embedded synthetic set)")
    p.add_argument("--cache", help="conversion cache (default: <data>/.geopose_cache)")
    p.add_argument("--space", default=str(HERE / "search_spaces" / "smoke.yaml"), help="search-space YAML")
    p.add_argument("--storage", help="experiments: a folder, or a URI s3://BUCKET/PREFIX or gs://... read and "
                   "written through pyarrow (default: runs/experiments)")  # fmt: skip
    p.add_argument("--local-cache", help="local mirror of a remote --storage: report files, the default "
                   "Optuna SQLite file (default: runs/cache/<bucket>/<prefix>)")  # fmt: skip
    p.add_argument("--name", help="experiment name (default: the space file's name)")
    p.add_argument("--weights-cache", help="pretrained encoder weights, downloaded once before the trials "
                   "(default: runs/weights; on a cluster a shared folder)")  # fmt: skip
    p.add_argument("--optuna-storage", metavar="URL", help="the Optuna study's database, named after the "
                   "experiment (default: sqlite:///<storage>/<name>/optuna.db, in the local cache when "
                   "--storage is a URI; on a cluster a PostgreSQL URL); --resume continues the same study")  # fmt: skip
    p.add_argument("--mlflow", metavar="URI", help="log every trial as an MLflow run (experiment = --name) "
                   "to this tracking URI, e.g. http://HOST:5000 or sqlite:///mlflow.db (needs mlflow)")  # fmt: skip
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
    p.add_argument("--num-samples", type=int, help="trials (default: the space's num_samples)")
    p.add_argument("--workers-per-trial", type=int, help="Train workers per trial (default: hint, else 2)")
    p.add_argument("--gpus-per-worker", type=float, help="default: 1 if the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-worker", type=float, help="default: space hint, else 1")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a Config key the "
                   "space does not search, e.g. --set init_checkpoint=DIR (repeatable; VALUE is YAML)")  # fmt: skip
    p.add_argument("--max-concurrent", type=int, help="cap on trials at once (default: as many as the cluster "
                   "fits, re-read while the search runs)")  # fmt: skip
    p.add_argument("--pending-trials", type=int, help="trials admitted beyond what fits, so an autoscaler adds "
                   "nodes (default: 0 on a local instance, 1 with --address)")  # fmt: skip
    p.add_argument("--fold", type=int, default=0, help="validation fold of the search")
    p.add_argument("--folds", help="refit folds: a count or a comma list (default: the fold after --fold, so the "
                   "out-of-fold scores that choose members and fit the blend did not choose the configs; "
                   "the search's own fold reuses its full-budget trials)")  # fmt: skip
    p.add_argument("--refit-top", type=int, help="refit the K best configs on every fold (default: 1 with no "
                   "--space, else 0)")  # fmt: skip
    p.add_argument("--refit-seeds", type=int, help="train each refit config with N seeds, N members (default: "
                   "2 with no --space, else 1)")  # fmt: skip
    p.add_argument("--refit-epochs", type=int, help="train each refit for N epochs (default: the space's "
                   "max_epochs); more than the search's budget helps when its models are undertrained")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="finish the interrupted experiment --name")
    p.add_argument("--max-failures", type=int, default=1, help="Train restarts per trial after a crash")
    p.add_argument("--seed", type=int, default=0, help="seeds Optuna's sampler and every trial's training "
                   "(unless the space fixes or searches `seed`)")  # fmt: skip
    p.add_argument("--max-epochs", type=int, help="override the space's scheduler.max_epochs")
    p.add_argument("--verbose", action="store_true", help="Ray's full console: every worker's output")
    p.add_argument("--dry-run", action="store_true", help="check the data, space and resources, print the "
                   "plan (trials, workers, CPUs/GPUs, storage) and stop before training")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from geopose_ray.tune.launch import search_from_args

    embedded = Path(args.space).resolve() == Path(parse_args([]).space).resolve()
    result = search_from_args(args, embedded)  # bad input: InputError, exit 2 (run_cli)
    return 1 if result is not None and result.interrupted else 0


if __name__ == "__main__":
    run_cli(main)
