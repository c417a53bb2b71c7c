"""The conversion cache: every tile once as tiled GeoTIFF, plus one `samples.csv` index.

JPEG 2000 decoding takes ~1 s per 2048 px tile and a 512 px window still ~0.6 s (LIBS_NOTES
section 1); a tiled, uncompressed GeoTIFF reads the same window in under a millisecond. So
`convert` decodes each tile once into

    CACHE/train/{stem}_RGB.tif   (H, W, 3) uint8, 256 px blocks
    CACHE/train/{stem}_AGL.tif   (H, W) uint16 cm, 65535 = no data (the original values)
    CACHE/test/{stem}_RGB.tif
    CACHE/samples.csv            id, city, gsd, split, rgb, agl, scale px/m, angle rad, group,
                                 agl_n, agl_sum m, agl_sq m^2 (the AGL's valid pixels, their sum
                                 and sum of squares: train tiles; empty for test tiles)

Each file is written under a temporary name and renamed, so a file under its final name is
always complete: a re-run skips it, and two conversions running at once only ever replace a
complete file with an identical one. This module does no parallelism (no `ray`): `convert.py`
fans `convert_sample` out as Ray tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geopose_ray import paths
from geopose_ray.atomic import atomic_path
from geopose_ray.data import io, layout
from geopose_ray.data.layout import Sample
from geopose_ray.errors import InputError

SAMPLES_CSV = "samples.csv"
SAMPLES_COLUMNS = ("id", "city", "gsd", "split", "rgb", "agl", "scale", "angle", "group")
STATS_COLUMNS = ("agl_n", "agl_sum", "agl_sq")  # per-tile target sums: any split's means are sums of them


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
    group: str = ""  # scene key for leak-aware folds ("" = none given)
    agl_n: int = 0  # valid AGL pixels (0: unknown, e.g. a cache written before the sums existed)
    agl_sum: float = math.nan  # their sum, m
    agl_sq: float = math.nan  # their sum of squares, m^2


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


def cached_record(sample: Sample, cache_dir: Path, known: dict[str, dict] | None = None) -> dict[str, object]:
    """One samples.csv row; reads the tile's VFLOW json (scale px/m, angle rad) and, unless
    `known` (id -> sums of an earlier index) has them, its cached AGL's sums."""
    rgb_out, agl_out = cache_paths(sample, cache_dir)
    vflow = io.read_vflow(sample.vflow) if sample.vflow is not None else io.VFlow(math.nan, math.nan)
    return {
        "id": sample.id,
        "city": sample.city,
        "gsd": sample.gsd,
        "split": sample.split,
        "rgb": rgb_out.relative_to(cache_dir).as_posix(),
        "agl": agl_out.relative_to(cache_dir).as_posix() if agl_out is not None else "",
        "scale": vflow.scale,
        "angle": vflow.angle,
        "group": sample.group,
        **(_sums(sample.id, agl_out, known or {}) if agl_out is not None else dict.fromkeys(STATS_COLUMNS, "")),
    }


def agl_sums(path: Path) -> dict[str, float]:
    """`STATS_COLUMNS` of one cached AGL tile, in float64: read once here, at conversion, so that
    no trial reads the whole training set for its target means (`data.dataset.target_stats`)."""
    agl = io.read_agl(path).astype(np.float64)  # (H, W) m NaN
    valid = agl[np.isfinite(agl)]
    return {"agl_n": int(valid.size), "agl_sum": float(valid.sum()), "agl_sq": float(np.square(valid).sum())}


def _sums(sample_id: str, agl: Path, known: dict[str, dict]) -> dict[str, float]:
    return known[sample_id] if sample_id in known else agl_sums(agl)


def _known_sums(cache_dir: Path) -> dict[str, dict]:
    """The AGL sums an earlier index of this cache holds: a cached tile is never rewritten, so a
    refresh (new tiles, a crashed run repaired) reads only the tiles it has no sums for, or rewrote."""
    try:
        earlier = load_cache(cache_dir, "train")
    except InputError:  # no index yet, or an unreadable one
        return {}
    return {
        s.id: {"agl_n": s.agl_n, "agl_sum": s.agl_sum, "agl_sq": s.agl_sq}
        for s in earlier
        if math.isfinite(s.agl_sum) and math.isfinite(s.agl_sq)
    }


def write_samples_csv(samples: list[Sample], cache_dir: str | Path, rewritten: set[str] = frozenset()) -> Path:
    """Write the cache index atomically (rows in id order, so two runs give the same bytes).
    `rewritten`: ids whose tiles this run converted, so their sums are read from the new tiles."""
    cache_dir = Path(cache_dir)
    known = {k: v for k, v in _known_sums(cache_dir).items() if k not in rewritten}
    rows = [cached_record(s, cache_dir, known) for s in sorted(samples, key=lambda s: (s.split, s.id))]
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
            dtype={"id": str, "group": str},
            keep_default_na=False,
            na_values={k: ["NaN", "nan", ""] for k in ("scale", "angle", "agl_sum", "agl_sq", "agl_n")},
        )
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(path, f"cannot parse CSV ({e.__class__.__name__})") from None
    missing = [c for c in SAMPLES_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}: re-run python -m geopose_ray.convert")
    if split is not None:
        df = df[df["split"] == split]
    for col in STATS_COLUMNS:  # an older cache: its sums are read from the tiles when needed
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
            agl_n=int(r.agl_n) if math.isfinite(r.agl_n) else 0,
            agl_sum=float(r.agl_sum),
            agl_sq=float(r.agl_sq),
        )
        for r in df.itertuples(index=False)
    ]


def load_all(data_dir: Path) -> list[Sample]:
    """Both splits (test only when the data set ships one), every file validated."""
    samples = layout.load_split(data_dir, "train")
    if layout.has_split(data_dir, "test"):
        samples += layout.load_split(data_dir, "test")
    layout.validate_samples(samples)
    return samples


def is_current(data_dir: Path, cache_dir: Path) -> bool:
    """Cheap check (CSV tables and file existence, no decoding): the cache lists exactly the
    data set's tiles, every one is converted and has its sums, so a regenerated data set is noticed."""
    if not (cache_dir / SAMPLES_CSV).is_file():
        return False
    samples = layout.load_split(data_dir, "train")
    if layout.has_split(data_dir, "test"):
        samples += layout.load_split(data_dir, "test")
    cached = load_cache(cache_dir, None)
    if any(c.agl is not None and not math.isfinite(c.agl_sum) for c in cached):
        return False  # written before the per-tile sums: convert adds them (the tiles are kept)
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


def ensure_converted(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cache of `data_dir`, converting missing tiles here, serially, when it is not current.

    No Ray (the train and predict cores run where Ray is not installed); `python -m
    geopose_ray.convert` converts a big data set in parallel beforehand. Concurrent callers
    (DDP ranks) are safe: every cache file is written atomically.
    """
    data_dir = Path(data_dir).resolve()
    cache_dir = Path(cache_dir).resolve() if cache_dir else paths.default_cache_dir(data_dir)
    if not is_current(data_dir, cache_dir):
        samples = load_all(data_dir)
        todo = [s for s in samples if not is_converted(s, cache_dir)]
        for s in todo:
            convert_sample(s, cache_dir)
        write_samples_csv(samples, cache_dir, {s.id for s in todo})
    return cache_dir
