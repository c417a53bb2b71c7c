"""Convert a DrivenData-layout data set into the tiled-GeoTIFF cache, as parallel Ray tasks.

    python -m geopose_ray.convert DATA_DIR [--cache DIR] [--compress none|deflate] [--address ADDR]
    (the command: `convert/__main__.py`)

Every file of both splits is checked first (minutes, not hours): a bad file stops the command
with exit code 2 and one line naming it before anything is converted. Then each tile is one Ray
task (see `data/cache.py` for the cache layout and why re-runs and concurrent runs are safe),
and finally `samples.csv` is written. The cache holds no folds: every run computes its own from
its config (`data.folds.config_folds`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from geopose_ray import paths, ray_env
from geopose_ray.data import cache, layout
from geopose_ray.errors import InputError

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
        ray_env.init(address, num_cpus=min(LOCAL_CPUS, os.cpu_count() or 1), dashboard=False)
        _run_tasks(todo, cache_dir, compress, progress)
    cache.write_samples_csv(samples, cache_dir, {s.id for s in todo})
    return cache_dir


def ensure_cache(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cache for `data_dir`, converting only when it is missing or incomplete (a listed
    tile not converted, or the data set gained or lost tiles)."""
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir else paths.default_cache_dir(data_dir)
    if not cache.is_current(data_dir, cache_dir):
        return convert(data_dir, cache_dir)
    return cache_dir


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

    def done(bad: tuple[str, str] | None) -> None:
        if bad is not None:
            raise InputError(*bad)

    started = time.perf_counter()
    with tqdm(total=len(samples), unit="tile", desc="convert", disable=not progress, file=sys.stderr) as bar:
        ray_env.map_tasks(_convert_or_report, samples, cache_dir, compress, on_done=done, progress=bar.update)
    if progress:
        per_tile = (time.perf_counter() - started) / max(1, len(samples))
        print(f"converted {len(samples)} tiles, {per_tile:.3f} s/tile", file=sys.stderr)
