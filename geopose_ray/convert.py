"""Convert a DrivenData-layout data set into the tiled-GeoTIFF cache, as parallel Ray tasks.

    python -m geopose_ray.convert DATA_DIR [--cache DIR] [--compress none|deflate] [--address ADDR]

Every file of both splits is checked first (minutes, not hours): a bad file stops the command
with exit code 2 and one line naming it before anything is converted. Then each tile is one Ray
task (see `data/cache.py` for the cache layout and why re-runs and concurrent runs are safe),
and finally `samples.csv` is written. The cache holds no folds: every run computes its own from
its config (`data.folds.config_folds`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from geopose_ray import paths
from geopose_ray.data import cache, layout
from geopose_ray.errors import InputError, run_cli

LOCAL_CPUS = 4  # a local instance started just for conversion stays small


def convert(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    compress: str = "none",
    address: str | None = None,
    progress: bool = True,
) -> Path:
    """Validate, convert every tile not yet in the cache, write samples.csv; returns the cache
    folder. Uses the running Ray instance if there is one."""
    data_dir = Path(data_dir).resolve()  # Ray workers need absolute paths
    cache_dir = Path(cache_dir).resolve() if cache_dir else paths.default_cache_dir(data_dir)
    samples = cache.load_all(data_dir)
    todo = [s for s in samples if not cache.is_converted(s, cache_dir)]
    if todo:
        _init_ray(address)
        _run_tasks(todo, cache_dir, compress, progress)
    cache.write_samples_csv(samples, cache_dir)
    return cache_dir


def ensure_cache(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cache for `data_dir`, converting only when it is missing or incomplete (a listed
    tile not converted, or the data set gained or lost tiles)."""
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir else paths.default_cache_dir(data_dir)
    if not cache.is_current(data_dir, cache_dir):
        return convert(data_dir, cache_dir)
    return cache_dir


def _init_ray(address: str | None) -> None:
    """Join the given cluster, or start a small local instance (never a stale one, RAY_NOTES 0)."""
    import ray  # here, not at the top: a bad-input run ends in under a second

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = (
        {"num_cpus": min(LOCAL_CPUS, os.cpu_count() or 1), "include_dashboard": False}
        if address == "local"
        else {}
    )
    ray.init(address=address, log_to_driver=False, **kwargs)


def _convert_or_report(sample: layout.Sample, cache_dir: Path, compress: str) -> tuple[str, str] | None:
    """The Ray task: an InputError comes back as (path, problem), as InputError(path, problem)
    does not survive pickling (Exception pickles only its message)."""
    try:
        cache.convert_sample(sample, cache_dir, compress)
    except InputError as e:
        return e.path, e.problem
    return None


def _run_tasks(samples: Sequence[layout.Sample], cache_dir: Path, compress: str, progress: bool) -> None:
    """One task per tile; an InputError inside a task (a file that passed the cheap checks but
    does not decode) ends the command like any other bad input."""
    import ray

    task = ray.remote(num_cpus=1)(_convert_or_report)
    pending = [task.remote(s, cache_dir, compress) for s in samples]
    started = time.perf_counter()
    with tqdm(total=len(pending), unit="tile", desc="convert", disable=not progress, file=sys.stderr) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=min(len(pending), 8), timeout=5.0)
            for bad in ray.get(done):
                if bad is not None:
                    raise InputError(*bad)
            bar.update(len(done))
    if progress:
        per_tile = (time.perf_counter() - started) / max(1, len(samples))
        print(f"converted {len(samples)} tiles, {per_tile:.3f} s/tile", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geopose_ray.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("data_dir", type=Path, help="DrivenData layout root (train/, test/, CSV files)")
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default DATA_DIR/.geopose_cache)"
    )
    parser.add_argument(
        "--compress", choices=("none", "deflate"), default="none", help="cache tif compression"
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    args = parser.parse_args(argv)
    out = convert(args.data_dir, args.cache, args.compress, args.address)
    print(out)
    return 0


if __name__ == "__main__":
    run_cli(main)
