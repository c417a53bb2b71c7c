"""The conversion cache: every tile once as tiled GeoTIFF, plus one `samples.csv` index.

JPEG 2000 decodes a whole tile to read any window of it, while a tiled, uncompressed GeoTIFF
reads only the blocks a crop touches (the loader row of docs/BENCHMARKS.md measures both). So
conversion decodes each tile once into

    CACHE/train/{stem}_RGB.tif   (H, W, 3) uint8, 256 px blocks
    CACHE/train/{stem}_AGL.tif   (H, W) uint16 cm, 65535 = no data (the original values)
    CACHE/test/{stem}_RGB.tif
    CACHE/samples.csv            id, city, gsd, split, rgb, agl, scale px/m, angle rad, group,
                                 place, then per train tile (empty for test tiles): height,
                                 width px, agl_n, agl_sum m, agl_sq m^2 (the AGL's valid pixels,
                                 their sum and sum of squares), built (share above 2 m),
                                 disp_p95 px (how far its roofs lean)

`place` is the fold key: which train tiles show the same ground (`data.places`), so that no
place sits in two folds. Each tif is written under a temporary name and renamed, so a file
under its final name is always complete: a re-run skips it, and two conversions running at once
only ever replace a complete file with an identical one. An index without this version's
columns is not current, so an older cache is re-indexed (its tiles kept), never used silently.
This module does no parallelism itself: `geopose_ray.convert` passes in the caller's map.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from geopose_ray import paths
from geopose_ray.atomic import atomic_path
from geopose_ray.data import io, layout, places, stats
from geopose_ray.data.layout import Sample
from geopose_ray.errors import InputError

SAMPLES_CSV = "samples.csv"
SAMPLES_COLUMNS = ("id", "city", "gsd", "split", "rgb", "agl", "scale", "angle", "group", "place")
# per train tile, read once at conversion: the AGL sums (any split's target means are sums of
# them), the size, the share of built pixels and the displacement that the derived defaults use
STATS_COLUMNS = ("height", "width", "agl_n", "agl_sum", "agl_sq", "built", "disp_p95")


@dataclass(frozen=True)
class CachedSample:
    id: str
    city: str
    gsd: float  # m/px
    split: str  # "train" | "test"
    rgb: Path  # tiled GeoTIFF, (H, W, 3) uint8
    agl: Path | None  # tiled GeoTIFF, (H, W) uint16 cm; None for test tiles
    scale: float  # px/m; NaN for test tiles
    angle: float  # rad; NaN for test tiles
    group: str = ""  # metadata.csv's place name, when the data set gives one ("" = none)
    place: str = ""  # the place this tile shows (given group, else found): the fold key
    agl_n: int = 0  # valid AGL pixels (0: unknown, e.g. a cache written before the sums existed)
    agl_sum: float = math.nan  # their sum, m
    agl_sq: float = math.nan  # their sum of squares, m^2
    height: int = 0  # px (0: not measured: a test tile)
    width: int = 0  # px
    built: float = math.nan  # share of valid AGL pixels above BUILT_M
    disp_p95: float = math.nan  # px: 95th percentile of AGL x scale over built pixels


def cache_paths(sample: Sample, cache_dir: Path) -> tuple[Path, Path | None]:
    """Where a sample's converted RGB and AGL live in the cache."""
    folder = cache_dir / sample.split
    agl = folder / f"{sample.stem}_AGL.tif" if sample.agl is not None else None
    return folder / f"{sample.stem}_RGB.tif", agl


def convert_sample(sample: Sample, cache_dir: str | Path, compress: str = "none") -> int:
    """Convert one tile's RGB (and AGL) into the cache; finished files are skipped.
    Returns the number of files written (0 when everything was already there)."""
    rgb_out, agl_out = cache_paths(sample, Path(cache_dir))
    written = 0
    if not rgb_out.is_file():
        io.write_rgb_tiled(rgb_out, io.read_rgb(sample.rgb), compress=compress)
        written += 1
    if sample.agl is not None and agl_out is not None and not agl_out.is_file():
        io.write_agl_tiled(agl_out, io.read_agl_cm(sample.agl), compress=compress)
        written += 1
    return written


def is_converted(sample: Sample, cache_dir: str | Path) -> bool:
    rgb_out, agl_out = cache_paths(sample, Path(cache_dir))
    return rgb_out.is_file() and (agl_out is None or agl_out.is_file())


def index_tile(sample: Sample, cache_dir: Path, find_place: bool) -> tuple[dict[str, Any], Any]:
    """One train tile's index columns and, when places must be found, its place descriptor: a
    task of the conversion's map (a large set is read in parallel), reading its cached AGL and
    its VFLOW json once for both (`data.stats.agl_stats`, `data.places.describe`)."""
    rgb_out, agl_out = cache_paths(sample, cache_dir)
    vflow = io.read_vflow(sample.vflow)  # scale px/m, angle rad
    agl = io.read_agl(agl_out)  # (H, W) m NaN
    row = {"id": sample.id, "scale": vflow.scale, "angle": vflow.angle, **stats.agl_stats(agl, vflow.scale)}
    if not find_place:
        return row, None
    rgb = functools.partial(io.read_rgb, rgb_out)
    return row, places.describe(places.PlaceTile(sample.id, sample.city, vflow.scale, vflow.angle, agl, rgb, sample.gsd))


def agl_sums(path: Path) -> dict[str, float]:
    """The AGL sums of one cached tile, in float64: for a cache whose index lacks them."""
    measured = stats.agl_stats(io.read_agl(path), math.nan)
    return {k: measured[k] for k in ("agl_n", "agl_sum", "agl_sq")}


def _record(sample: Sample, cache_dir: Path, measured: dict[str, Any], place: str) -> dict[str, object]:
    """One samples.csv row (`measured`: `index_tile`'s row of a train tile, {} for a test tile)."""
    rgb_out, agl_out = cache_paths(sample, cache_dir)
    return {
        "id": sample.id,
        "city": sample.city,
        "gsd": sample.gsd,
        "split": sample.split,
        "rgb": rgb_out.relative_to(cache_dir).as_posix(),
        "agl": agl_out.relative_to(cache_dir).as_posix() if agl_out is not None else "",
        "scale": measured.get("scale", math.nan),
        "angle": measured.get("angle", math.nan),
        "group": sample.group,
        "place": place,
        **{k: measured.get(k, "") for k in STATS_COLUMNS},
    }


def write_samples_csv(
    samples: list[Sample], cache_dir: str | Path, map_fn: Callable[..., Iterable[Any]] = map
) -> Path:
    """Write the cache index atomically (rows in (split, id) order, so two runs give the same
    bytes). Every train tile is read once through `map_fn` (`index_tile`), and its place is
    metadata.csv's `group` when every train tile has one (the data set's own answer), else found
    by matching the tiles' ground-projected AGL over all of them (`data.places`), so a set that
    gained a tile is regrouped."""
    cache_dir = Path(cache_dir)
    train = [s for s in samples if s.agl is not None]
    given = all(s.group for s in train)
    indexed = list(map_fn(functools.partial(index_tile, cache_dir=cache_dir, find_place=not given), train))
    per_tile = {row["id"]: row for row, _ in indexed}
    if given:
        found = {s.id: f"{s.city}/{s.group}" for s in train}
    else:
        found = places.group_descriptors([d for _, d in indexed], map_fn)
    rows = [
        _record(s, cache_dir, per_tile.get(s.id, {}), found.get(s.id, ""))
        for s in sorted(samples, key=lambda s: (s.split, s.id))
    ]
    path = cache_dir / SAMPLES_CSV
    with atomic_path(path) as tmp:
        columns = [*SAMPLES_COLUMNS, *STATS_COLUMNS]
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False, float_format="%.17g")
    return path


def load_cache(cache_dir: str | Path, split: str | None = "train") -> list[CachedSample]:
    """The cached samples of `split` ("train" | "test"; None = both) with absolute paths."""
    cache_dir = Path(cache_dir)
    path = cache_dir / SAMPLES_CSV
    if not path.is_file():
        raise InputError(path, "conversion cache not found: run python -m geopose_ray.convert first")
    try:
        df = pd.read_csv(
            path,
            dtype={"id": str, "group": str, "place": str},
            keep_default_na=False,
            na_values={k: ["NaN", "nan", ""] for k in ("scale", "angle", *STATS_COLUMNS)},
        )
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(path, f"cannot parse CSV ({e.__class__.__name__})") from None
    missing = [c for c in SAMPLES_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, f"an older cache without column(s) {missing}: re-run python -m geopose_ray.convert")
    if split is not None:
        df = df[df["split"] == split]
    for col in STATS_COLUMNS:  # an index written by hand or by a test: read from the tiles when needed
        if col not in df.columns:
            df[col] = math.nan
    return [
        CachedSample(
            id=r.id,
            city=r.city,
            gsd=float(r.gsd),
            split=r.split,
            rgb=cache_dir / r.rgb,
            agl=cache_dir / r.agl if r.agl else None,
            scale=float(r.scale),
            angle=float(r.angle),
            group=r.group,
            place=r.place,
            agl_n=_int(r.agl_n),
            agl_sum=float(r.agl_sum),
            agl_sq=float(r.agl_sq),
            height=_int(r.height),
            width=_int(r.width),
            built=float(r.built),
            disp_p95=float(r.disp_p95),
        )
        for r in df.itertuples(index=False)
    ]


def _int(value: float) -> int:
    return int(value) if math.isfinite(value) else 0


def load_all(data_dir: Path) -> list[Sample]:
    """Both splits (test only when the data set ships one), every file validated."""
    samples = layout.load_split(data_dir, "train")
    if layout.has_split(data_dir, "test"):
        samples += layout.load_split(data_dir, "test")
    layout.validate_samples(samples)
    return samples


def is_current(data_dir: Path, cache_dir: Path) -> bool:
    """Cheap check (CSV tables and file existence, no decoding): the cache lists exactly the
    data set's tiles, every one is converted, and its index has this version's columns (an older
    index is rewritten by `convert`, its tiles kept), so a regenerated data set is noticed."""
    if not (cache_dir / SAMPLES_CSV).is_file():
        return False
    samples = layout.load_split(data_dir, "train")
    if layout.has_split(data_dir, "test"):
        samples += layout.load_split(data_dir, "test")
    try:
        cached = load_cache(cache_dir, None)
    except InputError:  # an older or unreadable index
        return False
    if any(c.agl is not None and not (math.isfinite(c.agl_sum) and c.height > 0) for c in cached):
        return False  # written before the per-tile statistics
    listed = {(s.split, s.id) for s in cached}
    return listed == {(s.split, s.id) for s in samples} and all(is_converted(s, cache_dir) for s in samples)


def validate_unless_cached(data_dir: str | Path, cache_dir: str | Path | None = None) -> None:
    """Refuse a bad data set before any cluster starts: unless its cache is current (converted
    from validated files; training then reads only the cache), every listed file is validated,
    so a run fails in seconds with one InputError, not inside every trial once Ray is up."""
    data_dir = Path(data_dir).resolve()
    cache_dir = Path(cache_dir).resolve() if cache_dir else paths.default_cache_dir(data_dir)
    if not is_current(data_dir, cache_dir):
        load_all(data_dir)


def require_current(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cache of `data_dir`, or InputError when it is missing or not current. Training never
    converts (a trial would spend its budget decoding): the driver ensures the cache first
    (`geopose_ray.convert.ensure_cache`)."""
    data_dir = Path(data_dir).resolve()
    cache_dir = Path(cache_dir).resolve() if cache_dir else paths.default_cache_dir(data_dir)
    if not is_current(data_dir, cache_dir):
        raise InputError(
            cache_dir / SAMPLES_CSV,
            f"conversion cache missing or not current: run python -m geopose_ray.convert {data_dir} --cache {cache_dir}",
        )
    return cache_dir
