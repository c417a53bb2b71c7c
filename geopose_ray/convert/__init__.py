"""Convert a DrivenData-layout data set into the tiled-GeoTIFF cache: the one way to build it.

    python -m geopose_ray.convert DATA_DIR [--cache DIR] [--compress none|deflate] [--workers N]
    (the command: `convert/__main__.py`)

Every file of both splits is checked first (seconds to minutes, not hours): a bad file stops
with exit code 2 and one line naming it before anything is converted. Then each tile is
converted by the caller's parallel map (`MapFn`), and finally `samples.csv` is written (see
`data/cache.py` for the layout and why re-runs and concurrent runs are safe).

The map is injected, so this package imports no Ray: the Ray layer passes Ray tasks
(`ray_env.task_map`: the search driver and the ensemble job, on a cluster), the Ray-free CLIs
(`python -m geopose_ray.convert`, `python -m geopose_ray.train`) a local process pool
(`process_map`). Train workers never convert: they only check that the cache is current
(`data.cache.require_current`), so a trial cannot spend its budget decoding JPEG 2000.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

from tqdm import tqdm

from geopose_ray import paths
from geopose_ray.data import cache, layout
from geopose_ray.errors import InputError

# fn(item) for every item; results in any order, as they finish. Both a process pool and Ray tasks
# pickle `fn`, so it is a module-level function or a functools.partial of one.
MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


def serial_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
    """The map of one process (tests, a single tile)."""
    return map(fn, items)


def process_map(workers: int | None = None) -> MapFn:
    """A local process pool of `workers` (default: every core) as a `MapFn`. Decoding JPEG 2000
    is CPU-bound in GDAL/OpenJPEG under the GIL, so threads would not help."""
    workers = workers or os.cpu_count() or 1

    def run(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        if workers <= 1 or len(items) <= 1:
            yield from map(fn, items)
            return
        # spawn, not fork: the caller may have started torch's threads (the train CLI)
        pool = futures.ProcessPoolExecutor(min(workers, len(items)), mp_context=mp.get_context("spawn"))
        try:
            for done in futures.as_completed([pool.submit(fn, item) for item in items]):
                yield done.result()
        finally:  # a bad tile stops the command: drop the tiles not started yet
            pool.shutdown(wait=True, cancel_futures=True)

    return run


def convert(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    compress: str = "none",
    map_fn: MapFn | None = None,
    progress: bool = True,
) -> Path:
    """Validate, convert every tile not yet in the cache with `map_fn` (default: a local process
    pool), write samples.csv; returns the absolute cache folder."""
    data_dir = Path(data_dir).resolve()  # the map's workers may run in another folder
    cache_dir = Path(cache_dir).resolve() if cache_dir else paths.default_cache_dir(data_dir)
    map_fn = map_fn or process_map()
    samples = cache.load_all(data_dir)
    todo = [s for s in samples if not cache.is_converted(s, cache_dir)]
    if todo:
        _convert_tiles(todo, cache_dir, compress, map_fn, progress)
    cache.write_samples_csv(samples, cache_dir, map_fn=map_fn)
    return cache_dir


def ensure_cache(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    map_fn: MapFn | None = None,
    progress: bool = True,
) -> Path:
    """The cache of `data_dir`, converting only when it is missing or not current (a listed tile
    not converted, the data set gained or lost tiles, or an index of an older format)."""
    data_dir = Path(data_dir).resolve()
    cache_dir = Path(cache_dir).resolve() if cache_dir else paths.default_cache_dir(data_dir)
    if not cache.is_current(data_dir, cache_dir):
        return convert(data_dir, cache_dir, map_fn=map_fn, progress=progress)
    return cache_dir


def _convert_or_report(sample: layout.Sample, cache_dir: Path, compress: str) -> tuple[str, str] | None:
    """One tile, in a worker process or a Ray task: an InputError comes back as (path, problem),
    as InputError(path, problem) does not survive pickling (Exception pickles only its message)."""
    try:
        cache.convert_sample(sample, cache_dir, compress)
    except InputError as e:
        return e.path, e.problem
    return None


def _convert_tiles(
    samples: Sequence[layout.Sample], cache_dir: Path, compress: str, map_fn: MapFn, progress: bool
) -> None:
    """Every tile once; an InputError inside a worker (a file that passed the cheap checks but
    does not decode) ends the command like any other bad input."""
    started = time.perf_counter()
    task = functools.partial(_convert_or_report, cache_dir=cache_dir, compress=compress)
    with tqdm(total=len(samples), unit="tile", desc="convert", disable=not progress, file=sys.stderr) as bar:
        for bad in map_fn(task, samples):
            if bad is not None:
                raise InputError(*bad)
            bar.update(1)
    if progress:
        per_tile = (time.perf_counter() - started) / max(1, len(samples))
        print(f"converted {len(samples)} tiles, {per_tile:.3f} s/tile", file=sys.stderr)
