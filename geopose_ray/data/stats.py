"""What a data set is like, measured from its AGL and VFLOW: the tile size, how far its roofs
lean (displacement = AGL x scale, px), how much of it is built. The derived defaults
(`data.derive`) are set from these numbers, so that a data set of tall, sparse buildings on
large tiles is not trained with the crop of a gentle one.

Measured once per tile at conversion (the cache's index holds each tile's numbers), or, for a
dry run over a data set not yet converted, on a sample of its AGL files read directly (they
are GeoTIFF already: no JPEG 2000 is decoded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geopose_ray.data import io, layout

BUILT_M = 2.0  # m: a pixel above this is "built" (roof or tree), the building-density threshold
DRY_RUN_TILES = 48  # AGL files a dry run reads when the set is not converted yet


def agl_stats(agl: np.ndarray, scale: float) -> dict[str, float]:
    """One tile's numbers. `agl` (H, W) m with NaN no data, `scale` px/m. `disp_p95` px is the
    95th percentile of AGL x scale over the built pixels: how far the tile's roofs lean from
    their footprints, which a training crop must hold to show both."""
    agl = agl.astype(np.float64)
    valid = agl[np.isfinite(agl)]
    built = valid[valid > BUILT_M]
    return {
        "height": int(agl.shape[0]),
        "width": int(agl.shape[1]),
        "agl_n": int(valid.size),
        "agl_sum": float(valid.sum()),
        "agl_sq": float(np.square(valid).sum()),
        "built": float(built.size / max(1, valid.size)),
        "disp_p95": float(np.percentile(built, 95) * scale) if built.size and math.isfinite(scale) else 0.0,
    }


def target_rms(tiles: Iterable[tuple[int, float, float]]) -> tuple[float, float] | None:
    """(AGL m, MAG px): the root mean square of the valid targets over tiles given as (valid
    pixels, sum of AGL² m², scale px/m), MAG = AGL x scale; None when no pixel is valid. The one
    formula behind the measured MAG rms (`DataStats.mag_rms`) and the model's output units
    (`data.dataset.target_units`)."""
    count = sq_agl = sq_mag = 0.0
    for n, agl_sq, scale in tiles:
        count, sq_agl, sq_mag = count + n, sq_agl + agl_sq, sq_mag + agl_sq * scale**2
    return (math.sqrt(sq_agl / count), math.sqrt(sq_mag / count)) if count else None


@dataclass(frozen=True)
class DataStats:
    """A data set's train tiles in a few numbers (px unless named otherwise)."""

    train_tiles: int  # in the data set
    measured: int  # tiles whose AGL was read (all of them at conversion, a sample in a dry run)
    tile_px: int  # the median tile's shorter side
    disp_p95: float  # 95th percentile over tiles of each tile's disp_p95: the lean to hold
    disp_max: float  # the largest tile's disp_p95
    built: float  # mean share of built pixels
    mag_rms: float = 0.0  # root mean square of MAG = AGL x scale over the valid pixels: the MAG loss's unit

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, float]], train_tiles: int) -> DataStats:
        """From per-tile `agl_stats` rows (or cached samples' same-named fields)."""
        if not rows:
            raise ValueError("no train tile to measure")
        side = np.array([min(r["height"], r["width"]) for r in rows])
        disp = np.array([r["disp_p95"] for r in rows], dtype=np.float64)
        labelled = [r for r in rows if math.isfinite(r.get("scale", math.nan)) and math.isfinite(r.get("agl_sq", math.nan))]
        rms = target_rms((r["agl_n"], r["agl_sq"], r["scale"]) for r in labelled)
        return cls(
            train_tiles=train_tiles,
            measured=len(rows),
            tile_px=int(np.median(side)),
            disp_p95=float(np.percentile(disp, 95)),
            disp_max=float(disp.max()),
            built=float(np.mean([r["built"] for r in rows])),
            mag_rms=rms[1] if rms else 0.0,
        )

    def lines(self) -> list[str]:
        """The plan's lines: what was measured, and on how many tiles."""
        sample = "" if self.measured == self.train_tiles else f" (a sample of {self.measured}, not converted yet)"
        return [
            f"{self.train_tiles} train tiles of {self.tile_px} px{sample}; {self.built:.0%} of pixels built "
            f"(AGL > {BUILT_M:g} m)",
            f"roof displacement (AGL x scale): 95th percentile {self.disp_p95:.0f} px "
            f"({self.disp_p95 / self.tile_px:.0%} of the tile), largest tile {self.disp_max:.0f} px; "
            f"root mean square {self.mag_rms:.1f} px",
        ]


def from_cache(samples: Sequence) -> DataStats:
    """The stats of converted train tiles (`data.cache.CachedSample`s: their index columns)."""
    rows = [
        {k: getattr(s, k) for k in ("height", "width", "built", "disp_p95", "agl_n", "agl_sq", "scale")}
        for s in samples
        if s.height > 0
    ]
    return DataStats.from_rows(rows, len(samples))


def from_files(data_dir: str | Path, max_tiles: int = DRY_RUN_TILES, seed: int = 0) -> DataStats:
    """The stats of a data set not converted yet, from an evenly drawn sample of its train
    tiles' AGL and VFLOW files (seconds, whatever its size)."""
    train = layout.load_split(data_dir, "train")
    if not train:
        raise ValueError("no train tile to measure")
    pick = np.random.default_rng(seed).permutation(len(train))[:max_tiles]
    rows = []
    for i in sorted(pick):
        scale = io.read_vflow(train[i].vflow).scale
        rows.append({**agl_stats(io.read_agl(train[i].agl), scale), "scale": scale})
    return DataStats.from_rows(rows, len(train))
