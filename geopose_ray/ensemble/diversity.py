"""How much any blend of two members can gain: the correlation of their out-of-fold errors.

A weighted mean of two members with errors e_a, e_b writes the error w e_a + (1 - w) e_b, so its
SSE is w² S_a + (1 - w)² S_b + 2 w (1 - w) X with X = <e_a, e_b>. X comes from three points of
the blend's own weight grid (each member alone and the pair's most even mix), scored as
`blend.tile_sse` scores what is written. For AGL this is exact up to the [0, max] clip; the vflow
field also blends scale and direction, so its correlation is the one a linear blend would imply.
With the correlation rho near 1 no weighting helps: two equally good members at rho = 0.97 can
remove only (1 - rho) / 2 = 1.5 % of their error. The report tells a user whether better blends
or more diverse members are what the ensemble needs. No `ray` import.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from geopose_ray.ensemble.blend import OofTable, grid_index, tile_sse, weight_grid


def _pair_row(grid: np.ndarray, a: int, b: int) -> tuple[int, float]:
    """The grid candidate that mixes only members a and b, closest to the even mix, and its
    weight on a (strictly between 0 and 1: the grid's step divides 1 at least twice)."""
    others = np.delete(np.arange(grid.shape[1]), [a, b])
    pair = (grid[:, others].sum(axis=1) == 0) & (grid[:, a] > 0) & (grid[:, b] > 0)
    rows = np.flatnonzero(pair)
    row = rows[np.argmin(np.abs(grid[rows, a] - 0.5))]
    return int(row), float(grid[row, a])


def _pair_stats(s_a: float, s_b: float, s_w: float, w: float) -> dict[str, float]:
    """Correlation of the two errors and the share of the better member's SSE that the best
    weight in [0, 1] removes, from the SSEs of a alone, b alone and the mix with weight w on a."""
    x = (s_w - w * w * s_a - (1 - w) ** 2 * s_b) / (2 * w * (1 - w))  # <e_a, e_b>
    denom = s_a + s_b - 2 * x  # = |e_a - e_b|², >= 0 for a linear blend
    best = min(s_a, s_b)
    if best <= 0:
        return {"corr": 1.0, "cut": 0.0}
    tol = 1e-9 * (s_a + s_b)  # identical members give denom 0 and x = sqrt(s_a s_b) up to rounding
    if denom < -tol or abs(x) > np.sqrt(s_a * s_b) + tol:
        # no pair of errors has these SSEs under a linear blend: the vflow blend is not linear
        # (scale and the unit direction are mixed apart), so no correlation is implied; what
        # the measured mix removed is still a fact. It was reported as 1.000 before.
        return {"corr": float("nan"), "cut": float(max(0.0, 1.0 - s_w / best))}
    if denom <= tol:
        return {"corr": 1.0, "cut": 0.0}
    w_star = float(np.clip((s_b - x) / denom, 0.0, 1.0))
    sse = w_star**2 * s_a + (1 - w_star) ** 2 * s_b + 2 * w_star * (1 - w_star) * x
    return {"corr": float(x / np.sqrt(s_a * s_b)), "cut": float(max(0.0, 1.0 - sse / best))}


def error_diversity(t: OofTable) -> list[dict[str, Any]]:
    """For every pair of member configs: the correlation of their OOF errors (AGL and vflow,
    pooled over tiles) and the share of the better one's SSE that their best two-member blend
    removes (`agl_cut`, `vflow_cut`, fractions). Empty with fewer than two members."""
    grid = weight_grid(t.k)
    n = len(t.ids)

    def sse(g: int) -> tuple[float, float]:
        agl, vflow = tile_sse(t, np.full(n, g))
        return float(agl.sum()), float(vflow.sum())

    alone = [sse(grid_index(one_hot)) for one_hot in np.eye(t.k)]
    pairs = []
    for a, b in itertools.combinations(range(t.k), 2):
        row, w = _pair_row(grid, a, b)
        mixed = sse(row)
        entry: dict[str, Any] = {"members": [a, b]}
        for i, name in enumerate(("agl", "vflow")):
            stats = _pair_stats(alone[a][i], alone[b][i], mixed[i], w)
            entry[f"{name}_corr"], entry[f"{name}_cut"] = stats["corr"], stats["cut"]
        pairs.append(entry)
    return pairs


def diversity_line(pairs: list[dict[str, Any]]) -> str | None:
    """One console line: the pairs' error correlations and what their best blend can remove
    (the range over pairs when there are several), or None with fewer than two members."""
    if not pairs:
        return None

    def span(key: str, pct: bool = False) -> str:
        # a missing correlation is NaN here, None once the report went through strict JSON
        vals = [p[key] * (100 if pct else 1) for p in pairs if p[key] is not None and np.isfinite(p[key])]
        if not vals:
            return "n/a (not a linear blend)"
        fmt = "{:.1f} %" if pct else "{:.3f}"
        lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
        return lo if lo == hi else f"{lo}-{hi}"

    return (
        f"members' OOF error correlation: AGL {span('agl_corr')}, vflow {span('vflow_corr')}; "
        f"the best two-member blend removes at most {span('agl_cut', True)} (AGL) and "
        f"{span('vflow_cut', True)} (vflow) of the better member's error"
    )
