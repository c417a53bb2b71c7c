"""Bench 1, loader: random 512 px crops per second from the conversion cache (tiled GeoTIFF) vs
decoding the original JPEG 2000 (and deflate AGL) for every crop, the same crops in both.

    python bench/loader.py [--quick] [--data DIR --cache DIR] [--crop 512]

Both sides run `GeoposeDataset` itself over two sample lists that differ only in their paths,
with identically seeded crop streams, so they read the same windows; the first crops are checked
to be bit-identical (the cache holds a lossless copy). `ratio` compares the crop reads (what the
cache replaces); `item_ratio` compares whole dataset items, whose tensor conversion both share.
Without --data it uses a synthetic set of 2048 px tiles, the real tile size (generated once).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench import common
from geopose_ray.data import cache, io, layout
from geopose_ray.data.cache import CachedSample
from geopose_ray.data.dataset import GeoposeDataset
from geopose_ray.errors import run_cli

GOAL = (">=", 50.0)
TILE_PX = 2048  # the challenge's tile size


class TimedReads(GeoposeDataset):
    """GeoposeDataset that adds up the seconds spent in `read` (the file I/O and decoding)."""

    read_s = 0.0

    def read(self, sample: CachedSample) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        out = super().read(sample)
        self.read_s += time.perf_counter() - t0
        return out


def paired_samples(
    data_dir: Path, cache_dir: Path, max_tiles: int = 4
) -> tuple[list[CachedSample], list[CachedSample]]:
    """(cached, original) records of the first `max_tiles` training tiles: the same ids, crops
    and labels, pointing at the cache's tiled GeoTIFFs or at the original j2k / deflate files.
    Missing cache files are converted here; no samples.csv is written (an existing cache keeps
    its own index)."""
    samples = layout.load_split(data_dir, "train")[:max_tiles]
    layout.validate_samples(samples)
    cached, original = [], []
    for s in samples:
        cache.convert_sample(s, cache_dir)
        rgb, agl = cache.cache_paths(s, cache_dir)
        vflow = io.read_vflow(s.vflow) if s.vflow is not None else io.VFlow(float("nan"), float("nan"))
        rec = CachedSample(s.id, s.city, s.gsd, s.split, rgb, agl, vflow.scale, vflow.angle, s.group)
        cached.append(rec)
        original.append(dataclasses.replace(rec, rgb=s.rgb, agl=s.agl))
    return cached, original


def _read_items(ds: TimedReads, n: int, keep: int) -> tuple[float, float, list[dict[str, Any]]]:
    """(item seconds, read seconds) of n items after one warm-up item; the first `keep` items."""
    ds[0]  # warm-up: GDAL driver, page cache (consumes one crop draw on both sides alike)
    ds.read_s = 0.0
    kept = []
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        item = ds[i % len(ds)]
        if len(kept) < keep:
            kept.append(item)
    return time.perf_counter() - t0, ds.read_s, kept


def same_items(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> bool:
    """Whether two item lists hold the same pixels (NaN AGL equal to NaN)."""
    return len(a) == len(b) and all(
        x["id"] == y["id"]
        and x["image"].shape == y["image"].shape
        and bool((x["image"] == y["image"]).all())
        and bool(np.array_equal(x["agl"].numpy(), y["agl"].numpy(), equal_nan=True))
        for x, y in zip(a, b)
    )


def crop_rates(
    cached: Sequence[CachedSample], original: Sequence[CachedSample], crop: int, n_cache: int, n_j2k: int
) -> dict[str, Any]:
    """Crops/s and items/s from the cache and from the originals; the same crop stream (seed 0)."""
    fast = TimedReads(cached, crop=crop, seed=0)
    slow = TimedReads(original, crop=crop, seed=0)
    check = min(2, n_j2k)
    slow_items_s, slow_read_s, slow_kept = _read_items(slow, n_j2k, check)
    fast_items_s, fast_read_s, fast_kept = _read_items(fast, n_cache, check)
    out = {
        "cache_crops_per_s": n_cache / fast_read_s,
        "j2k_crops_per_s": n_j2k / slow_read_s,
        "cache_items_per_s": n_cache / fast_items_s,
        "j2k_items_per_s": n_j2k / slow_items_s,
        "identical": same_items(fast_kept, slow_kept),
    }
    out["ratio"] = out["cache_crops_per_s"] / out["j2k_crops_per_s"]
    out["item_ratio"] = out["cache_items_per_s"] / out["j2k_items_per_s"]
    return out


def run(args: Any) -> list[dict[str, Any]]:
    work = common.work_dir(args.work)
    data = Path(args.data) if args.data else common.synthetic_set(work, TILE_PX, per_city=1)
    cache_dir = Path(args.cache) if args.cache else work / "loader_cache" / data.name
    cached, original = paired_samples(data, cache_dir, max_tiles=args.tiles)
    n_cache, n_j2k = (64, 6) if args.quick else (256, 24)
    res = crop_rates(cached, original, args.crop, n_cache, n_j2k)
    with io.open_raster(cached[0].rgb) as ds:
        tile = f"{ds.height}x{ds.width}"
    ratio = res.pop("ratio")
    return [
        common.emit(
            "loader",
            ratio,
            **res,
            crop=args.crop,
            tile=tile,
            tiles=len(cached),
            crops_cache=n_cache,
            crops_j2k=n_j2k,
            data="real" if args.data else "synthetic",
            goal=">= 50x",
            goal_met=common.goal_met(ratio, *GOAL),
        )
    ]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--data", help="DrivenData-layout folder (default: a synthetic 2048 px set)")
    p.add_argument("--cache", help="conversion cache folder (default: in the bench folder)")
    p.add_argument("--crop", type=int, default=512, help="crop size, px")
    p.add_argument("--tiles", type=int, default=4, help="tiles to read from (the first N by the train CSV)")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
