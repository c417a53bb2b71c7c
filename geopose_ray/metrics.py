"""The official challenge score (docs/GEOPOSE.md, 'The metric') as mergeable per-city sums.

The baseline's `evaluate.py` needs two passes over the test set (the R² denominators use the city
mean). Keeping the sum of squares as well gives the same denominators in one pass:
sum((y - m)^2) = sumsq - 2 m S + n m^2 for any m, here the official m = S / (n + 1e-4). The sums
add up across images, DDP ranks and Ray tasks, so every consumer (validation, Tune reports, the
ensemble, the scorer CLI) uses this one implementation.

Units: AGL metres, scale px/m, angle radians, vflow px. R² does not depend on the units as long as
truth and prediction share them (metres with px/m gives the same vflow as cm with px/cm).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from geopose_ray.constants import CITIES

EPS = 1e-4  # the official `+ 0.0001` in both the mean and the R² denominator

# Columns of the (len(CITIES), N_FIELDS) float64 accumulator; every column is a plain sum.
FIELDS: tuple[str, ...] = (
    "images",  # images seen (updated or failed): tells "no data" (NaN) from "no valid pixel"
    "failed",  # images whose prediction was missing or non-finite: any -> the city scores 0
    "agl_n",  # finite truth pixels
    "agl_sum",  # sum of truth AGL, m
    "agl_sumsq",  # sum of truth AGL², m²
    "agl_sse",  # nansum((pred - truth)²), m²
    "vflow_n",  # finite truth vflow components (2 per valid pixel)
    "vflow_sum",  # sum of both truth components together, px
    "vflow_sumsq",  # px²
    "vflow_sse",  # summed over both components, px²
)
N_FIELDS = len(FIELDS)
_COL = {name: i for i, name in enumerate(FIELDS)}


def _city_row(city: str) -> int:
    try:
        return CITIES.index(city)
    except ValueError:
        raise ValueError(f"unknown city {city!r}; known: {CITIES}") from None


def _finite_scalar(x: Any) -> bool:
    return x is not None and math.isfinite(float(x))


def _vflow(mag: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) components of the flow field, px: mag * (sin a, cos a) (docs/GEOPOSE.md, 'Vector flow')."""
    return mag * math.sin(angle), mag * math.cos(angle)


def image_sums(
    agl_true: np.ndarray,
    agl_pred: np.ndarray,
    scale_true: float,
    angle_true: float,
    scale_pred: float,
    angle_pred: float,
) -> np.ndarray:
    """One image's contribution, (N_FIELDS,) float64, exactly as the official first pass.

    NaN in `agl_true` drops the pixel everywhere; NaN in `agl_pred` drops it from the SSE only
    (the official quirk for a predicted 65535), because the official code uses nansum.
    """
    t, p = np.asarray(agl_true), np.asarray(agl_pred)  # (H, W) m, NaN = no data; any float dtype
    if t.shape != p.shape:
        raise ValueError(f"agl_pred shape {p.shape} != agl_true shape {t.shape}")
    valid = np.isfinite(t)
    # (n,) float64 pixels with truth (NaN truth never counts); gather first, then widen: cheaper
    tv, pv = (t[valid], p[valid]) if not valid.all() else (t.ravel(), p.ravel())
    tv, pv = tv.astype(np.float64), pv.astype(np.float64)
    gx, gy = _vflow(tv * float(scale_true), float(angle_true))  # (n,) px each, finite
    keep = ~np.isnan(pv)  # nansum semantics: a NaN term leaves the SSE, an inf one stays
    if not keep.all():
        tk, pk, gxk, gyk = tv[keep], pv[keep], gx[keep], gy[keep]
    else:
        tk, pk, gxk, gyk = tv, pv, gx, gy
    px, py = _vflow(pk * float(scale_pred), float(angle_pred))
    out = np.zeros(N_FIELDS)
    out[_COL["images"]] = 1.0
    out[_COL["agl_n"]] = tv.size
    out[_COL["agl_sum"]] = tv.sum()
    out[_COL["agl_sumsq"]] = _sumsq(tv)
    out[_COL["agl_sse"]] = _sumsq(pk - tk)
    out[_COL["vflow_n"]] = 2 * tv.size  # both components of every valid pixel
    out[_COL["vflow_sum"]] = gx.sum() + gy.sum()
    out[_COL["vflow_sumsq"]] = _sumsq(gx) + _sumsq(gy)
    out[_COL["vflow_sse"]] = _sumsq(px - gxk) + _sumsq(py - gyk)
    return out


def _sumsq(x: np.ndarray) -> float:
    """sum(x²) of a 1-D float64 array (BLAS dot: no temporary)."""
    return float(np.dot(x, x))


def _r2(n: float, s: float, sumsq: float, sse: float) -> float:
    """Official R²: mean with +1e-4 in its count, +1e-4 in the denominator, no clipping at 0."""
    mean = s / (n + EPS)
    denom = sumsq - 2.0 * mean * s + n * mean * mean  # == sum((y - mean)^2), the official pass 2
    return 1.0 - sse / (denom + EPS)


def city_scores(sums: np.ndarray) -> np.ndarray:
    """The official city score of every (..., N_FIELDS) row of sums at once, as `compute` gives
    it one city at a time: NaN where no image, 0 where any image failed. For resampled sums
    (`uncertainty.place_draws`), where a loop over `compute` would cost thousands of calls."""
    col = {name: sums[..., i] for i, name in enumerate(FIELDS)}
    with np.errstate(divide="ignore", invalid="ignore"):
        agl = _r2(col["agl_n"], col["agl_sum"], col["agl_sumsq"], col["agl_sse"])
        vflow = _r2(col["vflow_n"], col["vflow_sum"], col["vflow_sumsq"], col["vflow_sse"])
    score = np.where(col["failed"] > 0, 0.0, (agl + vflow) / 2.0)
    return np.where(col["images"] == 0, np.nan, score)


class GeoposeScore:
    """Streaming official score: `update` per image, `+` across shards, `compute` at the end.

    `to_array`/`from_array` expose the (4, N_FIELDS) float64 sums for `torch.distributed.all_reduce`
    (SUM) or for shipping through Ray; merging is plain addition, so order never matters.
    """

    def __init__(self, sums: np.ndarray | None = None):
        shape = (len(CITIES), N_FIELDS)
        self.sums = np.zeros(shape) if sums is None else np.array(sums, dtype=np.float64).reshape(shape)

    # --- accumulation -------------------------------------------------------------------
    def update(
        self,
        city: str,
        agl_true: np.ndarray,
        agl_pred: np.ndarray | None,
        scale_true: float,
        angle_true: float,
        scale_pred: float | None,
        angle_pred: float | None,
        nan_pred_fails: bool = False,
    ) -> bool:
        """Add one image; returns False when it counts as failed (its city then scores 0).

        agl_true (H, W) m NaN = no data; agl_pred (H, W) m; scales px/m; angles rad.
        A None agl_pred or a None/NaN predicted scale or angle fails the image (official rule).
        NaN pixels in agl_pred drop out of the SSE as the official scorer does with a predicted
        65535; callers scoring raw model output should pass `nan_pred_fails=True` instead, so a
        diverged model cannot score well by predicting NaN.
        """
        row = _city_row(city)
        if not (_finite_scalar(scale_true) and _finite_scalar(angle_true)):
            raise ValueError(f"truth scale/angle must be finite, got {scale_true!r}, {angle_true!r}")
        if agl_pred is None or not (_finite_scalar(scale_pred) and _finite_scalar(angle_pred)):
            self.mark_failed(city)
            return False
        if nan_pred_fails and not np.isfinite(np.asarray(agl_pred)).all():
            self.mark_failed(city)
            return False
        self.sums[row] += image_sums(agl_true, agl_pred, scale_true, angle_true, scale_pred, angle_pred)
        return True

    def add_image_sums(self, city: str, sums: np.ndarray) -> None:
        """Add a precomputed `image_sums` row (e.g. computed in a worker thread or Ray task)."""
        self.sums[_city_row(city)] += np.asarray(sums, dtype=np.float64)

    def mark_failed(self, city: str) -> None:
        """Count one image of `city` whose prediction is missing or unusable."""
        row = _city_row(city)
        self.sums[row, _COL["images"]] += 1.0
        self.sums[row, _COL["failed"]] += 1.0

    def merge(self, other: GeoposeScore) -> GeoposeScore:
        """In-place sum; returns self."""
        self.sums += other.sums
        return self

    def __add__(self, other: GeoposeScore) -> GeoposeScore:
        if not isinstance(other, GeoposeScore):
            return NotImplemented
        return GeoposeScore(self.sums + other.sums)

    def __radd__(self, other: Any) -> GeoposeScore:
        if isinstance(other, int) and other == 0:  # lets builtin sum() start from 0
            return GeoposeScore(self.sums)
        return NotImplemented

    def __iadd__(self, other: GeoposeScore) -> GeoposeScore:
        return self.merge(other)

    # --- transport ----------------------------------------------------------------------
    def to_array(self) -> np.ndarray:
        """(len(CITIES), N_FIELDS) float64 copy, rows in CITIES order, columns in FIELDS order."""
        return self.sums.copy()

    @classmethod
    def from_array(cls, a: Any) -> GeoposeScore:
        """Inverse of `to_array`; accepts anything np.asarray takes (a CPU tensor included)."""
        return cls(np.asarray(a, dtype=np.float64))

    # --- result -------------------------------------------------------------------------
    def compute(self) -> dict[str, Any]:
        """Official scores.

        Returns `final` (mean of the four city scores; NaN when any city has no image, as the
        official scorer), `final_present` (mean over cities with images: for validation folds
        that lack a city), `cities`, `agl_r2`, `vflow_r2` (NaN for cities with no data or a
        failure; the failed city's score is 0.0) and `counts` {city: {images, failed, pixels}}.
        """
        cities: dict[str, float] = {}
        agl_r2: dict[str, float] = {}
        vflow_r2: dict[str, float] = {}
        counts: dict[str, dict[str, int]] = {}
        for row, city in enumerate(CITIES):
            s = dict(zip(FIELDS, self.sums[row].tolist()))
            counts[city] = {"images": int(s["images"]), "failed": int(s["failed"]), "pixels": int(s["agl_n"])}
            if s["images"] == 0 or s["failed"] > 0:
                agl_r2[city] = vflow_r2[city] = math.nan
                cities[city] = math.nan if s["images"] == 0 else 0.0
                continue
            agl_r2[city] = _r2(s["agl_n"], s["agl_sum"], s["agl_sumsq"], s["agl_sse"])
            vflow_r2[city] = _r2(s["vflow_n"], s["vflow_sum"], s["vflow_sumsq"], s["vflow_sse"])
            cities[city] = (agl_r2[city] + vflow_r2[city]) / 2.0
        present = [v for c, v in cities.items() if counts[c]["images"] > 0]
        return {
            "final": sum(cities.values()) / len(CITIES),
            "final_present": sum(present) / len(present) if present else math.nan,
            "cities": cities,
            "agl_r2": agl_r2,
            "vflow_r2": vflow_r2,
            "counts": counts,
        }
