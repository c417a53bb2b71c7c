"""Blend member predictions, and fit the blend on out-of-fold (OOF) predictions.

What a blend writes is `written_agl`: the weighted mean of the members' raw AGL, times the city
multiplier, clipped to [0, AGL_MAX_M] last. The fit scores exactly that. Clipping after the blend
makes the written map a piecewise function of the weights, which no fixed set of sums can give
for every weight vector, so the weights are searched on a fixed grid (`weight_grid`, steps of
1/18 for 3 members) and each OOF tile keeps, per grid candidate g, q[g] = sum a_g^2 and
c[g] = sum a_g y of the written map a_g (multiplier 1) over its valid truth pixels. A multiplier
m in [0, MULT_MAX] scales these to m^2 q and m c exactly while no member exceeds SAFE_AGL_M (the
top clip cannot bind); the rare pixels where one does are kept as they are and written with
`written_agl` at scoring time. With the members' scales and directions, the OFFICIAL score of any
grid blend (per-city multipliers, a metadata scale model) follows exactly (up to the float32 map of
`apply` and the cm rounding of written files): sum (a - y)^2 = q - 2c + sum y^2, and the vflow error of a tile is the same with
the tile's scale and direction (docs/GEOPOSE.md, 'The metric'). No `ray` import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LinearRegression

from geopose_ray.constants import CITIES
from geopose_ray.ensemble.written import (
    MULT_MAX,
    grid_index,
    tile_stats,
    weight_grid,
    written_agl,
)
from geopose_ray.metrics import FIELDS, GeoposeScore
from geopose_ray.predict import Prediction, blend_predictions, unit
from geopose_ray.uncertainty import interval

__all__ = [
    "BlendParams",
    "OofTable",
    "ScaleModel",
    "blend_predictions",
    "fit_blend",
    "fit_weights",
    "grid_index",
    "tile_stats",
    "weight_grid",
    "written_agl",
]

REFINEMENTS = ("weights", "scale_model", "agl_mult")  # fitted in this order, each kept only if it helps
_COL = {name: i for i, name in enumerate(FIELDS)}
_TILE_FIELDS = (
    "city",
    "fold",
    "gsd",
    "n",
    "ysum",
    "ysq",
    "q",
    "c",
    "scale",
    "direction",
    "scale_true",
    "angle_true",
)
_INT_FIELDS = ("city", "fold")


@dataclass
class OofTable:
    """Column arrays over N OOF tiles, K member configs and the G candidates of `weight_grid(K)`."""

    ids: np.ndarray  # (N,) str
    place: np.ndarray  # (N,) str: the place each tile shows (its id where unknown): the bootstrap's unit
    city: np.ndarray  # (N,) int index into CITIES
    fold: np.ndarray  # (N,) int
    gsd: np.ndarray  # (N,) m/px
    n: np.ndarray  # (N,) valid truth pixels
    ysum: np.ndarray  # (N,) m
    ysq: np.ndarray  # (N,) m²
    q: np.ndarray  # (N, G) sum of written AGL² at multiplier 1, m²
    c: np.ndarray  # (N, G) sum of written AGL x truth at multiplier 1, m²
    scale: np.ndarray  # (N, K) px/m
    direction: np.ndarray  # (N, K, 2) unit
    scale_true: np.ndarray  # (N,) px/m
    angle_true: np.ndarray  # (N,) rad
    high_tile: np.ndarray  # (H,) int tile row of each pixel some member puts above SAFE_AGL_M
    high_p: np.ndarray  # (H, K) its raw member AGL, m
    high_y: np.ndarray  # (H,) its truth, m

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> OofTable:
        """From `tile_stats` dicts that also hold `id`, `city` (name), `fold` and `gsd`."""
        if not records:
            raise ValueError("no out-of-fold tiles to fit a blend on")
        rows = sorted(records, key=lambda r: r["id"])
        cols: dict[str, Any] = {name: [r[name] for r in rows] for name in _TILE_FIELDS}
        cols["city"] = [CITIES.index(c) for c in cols["city"]]
        arrays = {
            k: np.asarray(v, dtype=np.int64 if k in _INT_FIELDS else np.float64) for k, v in cols.items()
        }
        k = arrays["scale"].shape[1]
        if arrays["q"].shape[1] != len(weight_grid(k)):
            raise ValueError(
                f"records hold {arrays['q'].shape[1]} weight candidates, the grid {len(weight_grid(k))}"
            )
        high_p = [np.asarray(r["high_p"], dtype=np.float64).reshape(-1, k) for r in rows]
        return cls(
            ids=np.array([r["id"] for r in rows]),
            place=np.array([str(r.get("place") or r["id"]) for r in rows]),
            **arrays,
            high_tile=np.repeat(np.arange(len(rows)), [len(h) for h in high_p]),
            high_p=np.concatenate(high_p),
            high_y=np.concatenate([np.asarray(r["high_y"], dtype=np.float64) for r in rows]),
        )

    @property
    def k(self) -> int:
        return self.scale.shape[1]

    def subset(self, mask: np.ndarray) -> OofTable:
        """The tiles where the boolean `mask` (N,) holds, with their high pixels."""
        keep = mask[self.high_tile]
        row = np.cumsum(mask) - 1  # new row of each kept tile
        tiles = {name: getattr(self, name)[mask] for name in ("ids", "place", *_TILE_FIELDS)}
        return OofTable(
            **tiles, high_tile=row[self.high_tile[keep]], high_p=self.high_p[keep], high_y=self.high_y[keep]
        )


def _high_sums(t: OofTable, w: np.ndarray, mult: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) sum a^2 and sum a y over each tile's high pixels, a = written_agl of the tile's blend."""
    q, c = np.zeros(len(t.ids)), np.zeros(len(t.ids))
    tiles, starts = np.unique(t.high_tile, return_index=True)  # high pixels are grouped by tile
    for i, lo, hi in zip(tiles, starts, [*starts[1:], len(t.high_tile)]):
        a = written_agl(t.high_p[lo:hi], w[i], mult[i])
        q[i], c[i] = a @ a, a @ t.high_y[lo:hi]
    return q, c


def tile_sse(
    t: OofTable, g: np.ndarray, mult: np.ndarray | None = None, scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile (AGL SSE (N,) m², vflow SSE (N,) px²) of what is written with per-tile weights
    `weight_grid(K)[g]` (g (N,) int), AGL multipliers mult (N,) in [0, MULT_MAX] (default 1)
    and, when given, scales (N,) px/m replacing the blended member scales."""
    mult = np.ones(len(g)) if mult is None else mult
    if not ((mult >= 0.0) & (mult <= MULT_MAX)).all():
        raise ValueError(f"AGL multipliers must lie in [0, {MULT_MAX}] to be scored, got {np.unique(mult)}")
    w = weight_grid(t.k)[g]  # (N, K)
    rows_n = np.arange(len(g))
    hq, hc = _high_sums(t, w, mult)
    q = mult**2 * t.q[rows_n, g] + hq  # sum of written AGL², m²
    c = mult * t.c[rows_n, g] + hc  # sum of written AGL x truth, m²
    s = np.einsum("nk,nk->n", w, t.scale) if scale is None else scale  # px/m
    u = unit(np.einsum("nk,nkd->nd", w, t.direction))  # (N, 2)
    cos_err = u[:, 0] * np.sin(t.angle_true) + u[:, 1] * np.cos(t.angle_true)
    st = t.scale_true
    return q - 2 * c + t.ysq, s**2 * q - 2 * s * st * cos_err * c + st**2 * t.ysq


def tile_rows(t: OofTable, g: np.ndarray, mult: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """(N, N_FIELDS) official metric sums of each tile as written (arguments as `tile_sse`)."""
    agl_sse, vflow_sse = tile_sse(t, g, mult, scale)
    st = t.scale_true
    rows = np.zeros((len(g), len(FIELDS)))
    rows[:, _COL["images"]] = 1.0
    rows[:, _COL["agl_n"]] = t.n
    rows[:, _COL["agl_sum"]] = t.ysum
    rows[:, _COL["agl_sumsq"]] = t.ysq
    rows[:, _COL["agl_sse"]] = agl_sse
    rows[:, _COL["vflow_n"]] = 2 * t.n
    rows[:, _COL["vflow_sum"]] = st * (np.sin(t.angle_true) + np.cos(t.angle_true)) * t.ysum
    rows[:, _COL["vflow_sumsq"]] = st**2 * t.ysq
    rows[:, _COL["vflow_sse"]] = vflow_sse
    return rows


def score_rows(t: OofTable, g: np.ndarray, mult: np.ndarray, scale: np.ndarray | None) -> dict[str, Any]:
    """`GeoposeScore.compute()` of what is written (arguments as `tile_sse`)."""
    sums = np.zeros((len(CITIES), len(FIELDS)))
    np.add.at(sums, t.city, tile_rows(t, g, mult, scale))
    return GeoposeScore(sums).compute()


def tile_interval(t: OofTable, g: np.ndarray, mult: np.ndarray, scale: np.ndarray | None) -> dict[str, Any]:
    """How far the score of what is written could move on other places (`uncertainty.interval`)."""
    return interval(tile_rows(t, g, mult, scale), t.city, t.place)


def final(result: dict[str, Any]) -> float:
    """The official final score; the mean over present cities when a city has no OOF tile."""
    return result["final"] if math.isfinite(result["final"]) else result["final_present"]


# --- blend parameters -------------------------------------------------------------------------
@dataclass
class ScaleModel:
    """scale px/m = a + b / gsd per city (off-nadir displacement per metre grows as pixels
    shrink); cities unseen in the fit use the pooled line."""

    coef: dict[str, tuple[float, float]]  # city -> (a px/m, b px)
    pooled: tuple[float, float]

    @classmethod
    def fit(cls, city: np.ndarray, gsd: np.ndarray, scale: np.ndarray) -> ScaleModel:
        def line(mask: np.ndarray) -> tuple[float, float]:
            x = 1.0 / gsd[mask, None]
            if mask.sum() < 2 or np.ptp(x) == 0:
                return float(scale[mask].mean()), 0.0
            reg = LinearRegression().fit(x, scale[mask])
            return float(reg.intercept_), float(reg.coef_[0])

        coef = {CITIES[c]: line(city == c) for c in np.unique(city)}
        return cls(coef=coef, pooled=line(np.ones(len(city), bool)))

    def predict(self, city: np.ndarray, gsd: np.ndarray) -> np.ndarray:
        ab = np.array([self.coef.get(CITIES[c], self.pooled) for c in city]).reshape(-1, 2)
        return ab[:, 0] + ab[:, 1] / gsd


@dataclass
class BlendParams:
    weights: list[float]  # one per member config, >= 0, sum 1
    agl_mult: dict[str, float] = field(default_factory=dict)  # city -> AGL factor (absent = 1)
    scale_model: ScaleModel | None = None  # replaces the blended scale when set

    def rows(self, t: OofTable) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Per-tile (grid candidates (N,), multipliers (N,), scales (N,) or None) for `score_rows`;
        ValueError when the weights are off `weight_grid`."""
        g = np.full(len(t.ids), grid_index(self.weights))
        mult = np.array([self.agl_mult.get(CITIES[c], 1.0) for c in t.city])
        scale = self.scale_model.predict(t.city, t.gsd) if self.scale_model else None
        return g, mult, scale

    def score(self, t: OofTable) -> dict[str, Any]:
        return score_rows(t, *self.rows(t))

    def apply(self, preds: Sequence[Prediction], gsd: float, city: str) -> Prediction:
        """The final prediction of a tile from its per-config predictions: AGL `written_agl`,
        scale and direction blended as `blend_predictions` (or the scale model's scale)."""
        out = blend_predictions(preds, self.weights)
        members = np.stack([p.agl for p in preds], axis=-1)  # (H, W, K) raw, m
        out.agl = written_agl(members, self.weights, self.agl_mult.get(city, 1.0)).astype(np.float32)
        if self.scale_model is not None:
            out.scale = float(self.scale_model.predict(np.array([CITIES.index(city)]), np.array([gsd]))[0])
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- fitting ----------------------------------------------------------------------------------
def fit_weights(t: OofTable, scale_model: ScaleModel | None = None) -> np.ndarray:
    """The `weight_grid` candidate with the best official OOF score, each scored on exactly what
    it writes; the plain mean unless a candidate beats it."""
    grid = weight_grid(t.k)
    scale = scale_model.predict(t.city, t.gsd) if scale_model else None
    ones = np.ones(len(t.ids))

    def score(g: int) -> float:
        return final(score_rows(t, np.full(len(t.ids), g), ones, scale))

    best_g = grid_index(np.full(t.k, 1.0 / t.k))
    best = score(best_g)
    for g in range(len(grid)):
        if (f := score(g)) > best + 1e-12:
            best_g, best = g, f
    return grid[best_g].copy()


def fit_city_multipliers(
    t: OofTable, weights: np.ndarray, scale_model: ScaleModel | None = None, bounds: tuple = (0.7, 1.5)
) -> dict[str, float]:
    """Per-city AGL factor maximising that city's OOF score (7th place found 1.05-1.20 by hand);
    a city's score depends only on its own factor, so each is a 1-D search within `bounds`."""
    if not 0.0 <= bounds[0] <= bounds[1] <= MULT_MAX:
        raise ValueError(f"multiplier bounds {bounds} must lie in [0, {MULT_MAX}]")
    out: dict[str, float] = {}
    for c in np.unique(t.city):
        sub = t.subset(t.city == c)
        g, _, scale = BlendParams(list(weights), scale_model=scale_model).rows(sub)
        out[CITIES[c]] = _best_multiplier(sub, CITIES[c], g, scale, bounds)
    return out


def _best_multiplier(
    sub: OofTable, city: str, g: np.ndarray, scale: np.ndarray | None, bounds: tuple
) -> float:
    def loss(m: float) -> float:
        return -score_rows(sub, g, np.full(len(sub.ids), m), scale)["cities"][city]

    res = minimize_scalar(loss, bounds=bounds, method="bounded")
    return float(res.x) if res.fun < loss(1.0) else 1.0


def fit_params(t: OofTable, use: set[str] | frozenset[str]) -> BlendParams:
    """Fit the refinements in `use` (a subset of REFINEMENTS) on `t`, in REFINEMENTS order."""
    scale_model = ScaleModel.fit(t.city, t.gsd, t.scale_true) if "scale_model" in use else None
    w = fit_weights(t, scale_model) if "weights" in use else weight_grid(t.k)[grid_index(np.ones(t.k))]
    mult = fit_city_multipliers(t, w, scale_model) if "agl_mult" in use else {}
    return BlendParams(weights=w.tolist(), agl_mult=mult, scale_model=scale_model)


MAX_TILE_GROUPS = 10  # one fold's tiles are cross-fitted in this many groups (leave-one-out below)


def tile_groups(t: OofTable) -> np.ndarray:
    """(N,) cross-fitting groups for the tiles of one fold: in (city, id) order, dealt round-robin
    into min(N, MAX_TILE_GROUPS) groups, so each city's tiles spread over the groups. Judged
    in-sample instead, a refinement always looks better: on a users'-data set with 12 training
    tiles per city (10 OOF tiles), per-city multipliers and a scale line fitted on 2-3 tiles per
    city were kept, and cost 0.24 of the official score on its test truth."""
    order = np.lexsort((t.ids, t.city))
    groups = np.empty(len(t.ids), dtype=np.int64)
    groups[order] = np.arange(len(t.ids)) % max(1, min(len(t.ids), MAX_TILE_GROUPS))
    return groups


def cross_fit(
    t: OofTable, use: set[str] | frozenset[str], groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-tile (grid candidates, multipliers, scales) of fitting `use` on every other group of
    tiles (default: each fold): what `score_rows` scores honestly."""
    groups = t.fold if groups is None else groups
    g = np.zeros(len(t.ids), dtype=np.int64)
    mult = np.ones(len(t.ids))
    scale = np.zeros(len(t.ids))
    for f in np.unique(groups):
        held = groups == f
        params = fit_params(t.subset(~held), use)
        g[held], mult[held], s = params.rows(t.subset(held))
        scale[held] = np.einsum("nk,nk->n", weight_grid(t.k)[g[held]], t.scale[held]) if s is None else s
    return g, mult, scale


def cross_fit_score(t: OofTable, use: set[str] | frozenset[str], groups: np.ndarray | None = None) -> float:
    """Honest score of fitting `use`: each group of tiles (default: each fold) is scored with
    parameters fitted on the others."""
    return final(score_rows(t, *cross_fit(t, use, groups)))


def fit_blend(t: OofTable, refinements: Sequence[str] = REFINEMENTS) -> tuple[BlendParams, dict[str, Any]]:
    """Greedy: try each refinement on top of those kept, keep it only if it raises the OOF score,
    cross-fitted: over folds when there are two or more, else over groups of the one fold's
    tiles (`tile_groups`); with a single tile nothing can be judged and nothing is kept. Returns
    the parameters fitted on all of `t` and a report of every score."""
    unknown = set(refinements) - set(REFINEMENTS)
    if unknown:
        raise ValueError(f"unknown refinements {sorted(unknown)}; known: {REFINEMENTS}")
    n_folds = len(np.unique(t.fold))
    groups = t.fold if n_folds >= 2 else tile_groups(t)
    n_groups = len(np.unique(groups))
    refinements = refinements if n_groups >= 2 else ()

    def judge(use: frozenset[str]) -> float:
        return cross_fit_score(t, use, groups) if use else final(fit_params(t, use).score(t))

    one_hot = np.eye(t.k)
    report: dict[str, Any] = {
        "tiles": len(t.ids),
        "folds": n_folds,
        "validation": f"cross-fitted over {n_groups} {'folds' if n_folds >= 2 else 'tile groups (one fold)'}",
        "members": [final(BlendParams(list(e)).score(t)) for e in one_hot],
        "plain_mean": final(BlendParams([1.0 / t.k] * t.k).score(t)),
        "tried": {},
    }
    kept: frozenset[str] = frozenset()
    best = judge(kept)
    for name in refinements:
        score = judge(kept | {name})
        report["tried"][name] = score
        if score > best + 1e-9:
            kept, best = kept | {name}, score
    params = fit_params(t, kept)
    report.update(kept=sorted(kept, key=REFINEMENTS.index), judged=best, params=params.to_dict())
    # the spread of each figure over other draws of places (uncertainty.interval)
    report["member_intervals"] = [tile_interval(t, *BlendParams(list(e)).rows(t)) for e in one_hot]
    judged_rows = cross_fit(t, kept, groups) if kept else params.rows(t)
    report["judged_interval"] = tile_interval(t, *judged_rows)
    report["blend"] = final(params.score(t))
    report["cities"] = params.score(t)["cities"]
    return params, report
