"""What a blend writes, and the per-tile sums that score any grid blend of it exactly (the first
half of `blend`'s method, see its module doc): `written_agl` (blend, multiply, clip), the weight
grid, and `tile_stats`, the statistics an OOF actor returns for one tile. No `ray` import.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from geopose_ray.constants import AGL_MAX_CM, CM_PER_M
from geopose_ray.predict import Prediction, unit

AGL_MAX_M = AGL_MAX_CM / CM_PER_M  # what a written uint16 file can hold
MULT_MAX = 2.0  # the largest city multiplier the OOF statistics can score
SAFE_AGL_M = AGL_MAX_M / MULT_MAX  # a blend of members at or below this never reaches the top clip
GRID_STEPS = 20  # finest weight step 1/20 ...
GRID_MAX = 500  # ... coarsened (to a multiple of 1/K) until the grid has at most this many points
CHUNK = 1 << 19  # pixels x grid candidates per block when summing the written maps


# --- the written map --------------------------------------------------------------------------
def written_agl(p: np.ndarray, w: np.ndarray | Sequence[float], mult: Any = 1.0) -> np.ndarray:
    """The AGL a blend writes, m (float64): members' raw AGL p (..., K), weights w (K,) or (K, G)
    (normalised over K) -> clip(mult * sum_k p_k w_k, 0, AGL_MAX_M), shape (...) or (..., G).
    Blend, multiply, clip: the one order of `BlendParams.apply` and of the OOF fit."""
    w = np.asarray(w, dtype=np.float64)
    out = np.asarray(p, dtype=np.float64) @ (w / w.sum(axis=0))
    if np.any(mult != 1.0):
        out *= mult
    return np.clip(out, 0.0, AGL_MAX_M, out=out)


@functools.cache
def weight_grid(k: int) -> np.ndarray:
    """(G, K) candidate weights: every vector of multiples of 1/D summing to 1, D a multiple of K
    (so the plain mean and each member alone are candidates), as fine as GRID_STEPS/GRID_MAX allow."""
    d = k * max(1, GRID_STEPS // k)
    while d > k and math.comb(d + k - 1, k - 1) > GRID_MAX:
        d -= k
    combos = list(itertools.combinations(range(d + k - 1), k - 1))  # stars and bars
    cuts = np.array(combos, dtype=np.int64).reshape(len(combos), k - 1)
    bars = np.hstack([np.full((len(cuts), 1), -1), cuts, np.full((len(cuts), 1), d + k - 1)])
    parts = np.diff(bars, axis=1) - 1  # (G, K) stars between bars, summing to d
    grid = parts / d
    grid.flags.writeable = False
    return grid


def grid_index(weights: Sequence[float] | np.ndarray) -> int:
    """Row of `weight_grid` equal to `weights` (normalised); ValueError when off the grid."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    grid = weight_grid(len(w))
    err = np.abs(grid - w).max(axis=1)
    i = int(err.argmin())
    if err[i] > 1e-9:
        step = grid[grid > 0].min()
        raise ValueError(
            f"weights {w.tolist()} are off the fit's weight grid (steps of {step:.4g}): "
            "only grid weights have an exact OOF score"
        )
    return i


# --- OOF statistics ---------------------------------------------------------------------------
def written_sums(p: np.ndarray, y: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G,) sum a_g^2 and (G,) sum a_g y over pixels, a_g = written_agl(p, grid[g]); p (n, K)
    raw member AGL no higher than SAFE_AGL_M, y (n,) truth. Pixels whose members are all in
    [0, SAFE_AGL_M] clip nowhere (their sums come from the Gram matrix), pixels whose members are
    all <= 0 write 0; only the rest, where the sign of the blend depends on g, are blended per g."""
    inside = ((p >= 0.0) & (p <= SAFE_AGL_M)).all(axis=1)
    mixed = ~inside & ~(p <= 0.0).all(axis=1)
    pi = p[inside]
    q = np.einsum("gk,kl,gl->g", grid, pi.T @ pi, grid)
    c = grid @ (y[inside] @ pi)
    pm, ym, wt = p[mixed], y[mixed], np.ascontiguousarray(grid.T)
    step = max(1, CHUNK // len(grid))  # pixels per block: the (step, G) block stays in cache
    for s in range(0, len(pm), step):
        a = written_agl(pm[s : s + step], wt)  # (step, G) m
        q += np.einsum("ng,ng->g", a, a)
        c += ym[s : s + step] @ a
    return q, c


def tile_stats(
    preds: Sequence[Prediction], agl_true: np.ndarray, scale_true: float, angle_true: float
) -> dict:
    """One tile's statistics for scoring every grid blend of its K member predictions."""
    for p in preds:
        if p.agl.shape != agl_true.shape:
            raise ValueError(f"prediction shape {p.agl.shape} != truth shape {agl_true.shape}")
    valid = np.isfinite(agl_true)
    y = agl_true[valid].astype(np.float64)  # (n,) m
    p = np.stack([pr.agl[valid] for pr in preds], axis=-1).astype(np.float64)  # (n, K) raw AGL, m
    high = (p > SAFE_AGL_M).any(axis=1)  # a multiplier may push these past the top clip: kept
    q, c = written_sums(p[~high], y[~high], weight_grid(len(preds)))
    return {
        "n": int(y.size),
        "ysum": float(y.sum()),
        "ysq": float(y @ y),
        "q": q.tolist(),  # (G,) m²
        "c": c.tolist(),  # (G,) m²
        "high_p": p[high].tolist(),  # (h, K) m
        "high_y": y[high].tolist(),  # (h,) m
        "scale": [float(pr.scale) for pr in preds],  # (K,) px/m
        "direction": [unit(pr.direction).tolist() for pr in preds],  # (K, 2)
        "scale_true": float(scale_true),
        "angle_true": float(angle_true),
    }
