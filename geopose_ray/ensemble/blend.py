"""Blend member predictions, and fit the blend on out-of-fold (OOF) predictions.

Each OOF tile is reduced to sufficient statistics (the Gram matrix of its K member AGL maps over
the valid truth pixels, their products with the truth, the members' scales and directions), from
which the OFFICIAL score of any blend (weights, per-city AGL multipliers, a metadata scale model)
follows exactly (up to the cm rounding of written files) without keeping a single map: for the
blend a = m * sum_k w_k p_k, sum (a - y)^2 = m^2 w'Gw - 2 m w'c + sum y^2, and the vflow error of
a tile is the same quadratic scaled by its blended scale and direction (GEOPOSE_SPEC section 3).
The fitted weights therefore optimise exactly what the leaderboard measures. No `ray` import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.linear_model import LinearRegression

from geopose_ray.constants import AGL_MAX_CM, CITIES, CM_PER_M
from geopose_ray.metrics import FIELDS, GeoposeScore
from geopose_ray.predict import Prediction, blend_predictions, unit

__all__ = ["BlendParams", "OofTable", "ScaleModel", "blend_predictions", "fit_blend", "fit_weights"]

AGL_MAX_M = AGL_MAX_CM / CM_PER_M  # what a written uint16 file can hold
REFINEMENTS = ("weights", "scale_model", "agl_mult")  # fitted in this order, each kept only if it helps
_COL = {name: i for i, name in enumerate(FIELDS)}


# --- OOF statistics ---------------------------------------------------------------------------
def tile_stats(
    preds: Sequence[Prediction], agl_true: np.ndarray, scale_true: float, angle_true: float
) -> dict:
    """One tile's sufficient statistics for scoring any blend of its K member predictions."""
    valid = np.isfinite(agl_true)
    y = agl_true[valid].astype(np.float64)  # (n,) m
    for p in preds:
        if p.agl.shape != agl_true.shape:
            raise ValueError(f"prediction shape {p.agl.shape} != truth shape {agl_true.shape}")
    p = np.stack([np.clip(pr.agl[valid], 0.0, AGL_MAX_M) for pr in preds]).astype(np.float64)  # (K, n)
    return {
        "n": int(y.size),
        "ysum": float(y.sum()),
        "ysq": float(y @ y),
        "gram": (p @ p.T).tolist(),  # (K, K) m²
        "cross": (p @ y).tolist(),  # (K,) m²
        "scale": [float(pr.scale) for pr in preds],  # (K,) px/m
        "direction": [unit(pr.direction).tolist() for pr in preds],  # (K, 2)
        "scale_true": float(scale_true),
        "angle_true": float(angle_true),
    }


@dataclass
class OofTable:
    """Column arrays over N OOF tiles and K member configs."""

    ids: np.ndarray  # (N,) str
    city: np.ndarray  # (N,) int index into CITIES
    fold: np.ndarray  # (N,) int
    gsd: np.ndarray  # (N,) m/px
    n: np.ndarray  # (N,) valid truth pixels
    ysum: np.ndarray  # (N,) m
    ysq: np.ndarray  # (N,) m²
    gram: np.ndarray  # (N, K, K) m²
    cross: np.ndarray  # (N, K) m²
    scale: np.ndarray  # (N, K) px/m
    direction: np.ndarray  # (N, K, 2) unit
    scale_true: np.ndarray  # (N,) px/m
    angle_true: np.ndarray  # (N,) rad

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> OofTable:
        """From `tile_stats` dicts that also hold `id`, `city` (name), `fold` and `gsd`."""
        if not records:
            raise ValueError("no out-of-fold tiles to fit a blend on")
        rows = sorted(records, key=lambda r: r["id"])
        cols: dict[str, Any] = {
            f.name: [r[f.name] for r in rows] for f in dataclasses.fields(cls) if f.name != "ids"
        }
        cols["city"] = [CITIES.index(c) for c in cols["city"]]
        arrays = {
            k: np.asarray(v, dtype=np.int64 if k in ("city", "fold") else np.float64) for k, v in cols.items()
        }
        return cls(ids=np.array([r["id"] for r in rows]), **arrays)

    @property
    def k(self) -> int:
        return self.gram.shape[1]

    def subset(self, mask: np.ndarray) -> OofTable:
        return OofTable(**{f.name: getattr(self, f.name)[mask] for f in dataclasses.fields(self)})


def score_rows(t: OofTable, w: np.ndarray, mult: np.ndarray, scale: np.ndarray | None) -> dict[str, Any]:
    """`GeoposeScore.compute()` of the blend with per-tile weights w (N, K), AGL multipliers
    mult (N,) and, when given, scales (N,) px/m replacing the blended member scales."""
    w = w / w.sum(axis=1, keepdims=True)
    q = np.einsum("nk,nkl,nl->n", w, t.gram, w)  # sum of blend² over valid pixels, m²
    c = np.einsum("nk,nk->n", w, t.cross)  # sum of blend * truth, m²
    s = np.einsum("nk,nk->n", w, t.scale) if scale is None else scale  # px/m
    u = unit(np.einsum("nk,nkd->nd", w, t.direction))  # (N, 2)
    cos_err = u[:, 0] * np.sin(t.angle_true) + u[:, 1] * np.cos(t.angle_true)
    st = t.scale_true
    rows = np.zeros((len(w), len(FIELDS)))
    rows[:, _COL["images"]] = 1.0
    rows[:, _COL["agl_n"]] = t.n
    rows[:, _COL["agl_sum"]] = t.ysum
    rows[:, _COL["agl_sumsq"]] = t.ysq
    rows[:, _COL["agl_sse"]] = mult**2 * q - 2 * mult * c + t.ysq
    rows[:, _COL["vflow_n"]] = 2 * t.n
    rows[:, _COL["vflow_sum"]] = st * (np.sin(t.angle_true) + np.cos(t.angle_true)) * t.ysum
    rows[:, _COL["vflow_sumsq"]] = st**2 * t.ysq
    rows[:, _COL["vflow_sse"]] = (mult * s) ** 2 * q - 2 * mult * s * st * cos_err * c + st**2 * t.ysq
    sums = np.zeros((len(CITIES), len(FIELDS)))
    np.add.at(sums, t.city, rows)
    return GeoposeScore(sums).compute()


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
        """Per-tile (weights (N, K), multipliers (N,), scales (N,) or None) for `score_rows`."""
        w = np.broadcast_to(np.asarray(self.weights, dtype=np.float64), (len(t.ids), t.k))
        mult = np.array([self.agl_mult.get(CITIES[c], 1.0) for c in t.city])
        scale = self.scale_model.predict(t.city, t.gsd) if self.scale_model else None
        return w, mult, scale

    def score(self, t: OofTable) -> dict[str, Any]:
        return score_rows(t, *self.rows(t))

    def apply(self, preds: Sequence[Prediction], gsd: float, city: str) -> Prediction:
        """The final prediction of a tile from its per-config predictions."""
        out = blend_predictions(preds, self.weights)
        out.agl = np.clip(out.agl * self.agl_mult.get(city, 1.0), 0.0, AGL_MAX_M).astype(np.float32)
        if self.scale_model is not None:
            out.scale = float(self.scale_model.predict(np.array([CITIES.index(city)]), np.array([gsd]))[0])
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- fitting ----------------------------------------------------------------------------------
def fit_weights(t: OofTable, scale_model: ScaleModel | None = None) -> np.ndarray:
    """Non-negative weights summing to 1 that maximise the official OOF score (SLSQP from the
    plain mean and from near each member); never worse than the plain mean on `t`."""
    k = t.k
    uniform = np.full(k, 1.0 / k)
    if k == 1:
        return uniform
    scale = scale_model.predict(t.city, t.gsd) if scale_model else None
    ones = np.ones(len(t.ids))

    def loss(w: np.ndarray) -> float:
        w = np.clip(w, 0.0, None)
        if w.sum() <= 1e-12:
            return 1e6
        return -final(score_rows(t, np.broadcast_to(w, (len(ones), k)), ones, scale))

    best_w, best = uniform, loss(uniform)
    for x0 in [uniform, *(0.9 * np.eye(k) + 0.1 / k)]:
        res = minimize(
            loss,
            x0,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * k,
            constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},),
            options={"maxiter": 200},
        )
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else uniform
        if (f := loss(w)) < best - 1e-12:
            best_w, best = w, f
    return best_w


def fit_city_multipliers(
    t: OofTable, weights: np.ndarray, scale_model: ScaleModel | None = None, bounds: tuple = (0.7, 1.5)
) -> dict[str, float]:
    """Per-city AGL factor maximising that city's OOF score (7th place found 1.05-1.20 by hand);
    a city's score depends only on its own factor, so each is a 1-D search."""
    out: dict[str, float] = {}
    for c in np.unique(t.city):
        sub = t.subset(t.city == c)
        w, _, scale = BlendParams(list(weights), scale_model=scale_model).rows(sub)
        out[CITIES[c]] = _best_multiplier(sub, CITIES[c], w, scale, bounds)
    return out


def _best_multiplier(
    sub: OofTable, city: str, w: np.ndarray, scale: np.ndarray | None, bounds: tuple
) -> float:
    def loss(m: float) -> float:
        return -score_rows(sub, w, np.full(len(sub.ids), m), scale)["cities"][city]

    res = minimize_scalar(loss, bounds=bounds, method="bounded")
    return float(res.x) if res.fun < loss(1.0) else 1.0


def fit_params(t: OofTable, use: set[str] | frozenset[str]) -> BlendParams:
    """Fit the refinements in `use` (a subset of REFINEMENTS) on `t`, in REFINEMENTS order."""
    scale_model = ScaleModel.fit(t.city, t.gsd, t.scale_true) if "scale_model" in use else None
    w = fit_weights(t, scale_model) if "weights" in use else np.full(t.k, 1.0 / t.k)
    mult = fit_city_multipliers(t, w, scale_model) if "agl_mult" in use else {}
    return BlendParams(weights=w.tolist(), agl_mult=mult, scale_model=scale_model)


def cross_fit_score(t: OofTable, use: set[str] | frozenset[str]) -> float:
    """Honest score of fitting `use`: each fold is scored with parameters fitted on the others."""
    w = np.zeros((len(t.ids), t.k))
    mult = np.ones(len(t.ids))
    scale = t.scale @ np.full(t.k, 1.0 / t.k)  # overwritten where a scale model is fitted
    for f in np.unique(t.fold):
        held = t.fold == f
        params = fit_params(t.subset(~held), use)
        w[held], mult[held], s = params.rows(t.subset(held))
        scale[held] = np.einsum("nk,nk->n", w[held], t.scale[held]) if s is None else s
    return final(score_rows(t, w, mult, scale))


def fit_blend(t: OofTable, refinements: Sequence[str] = REFINEMENTS) -> tuple[BlendParams, dict[str, Any]]:
    """Greedy: try each refinement on top of those kept, keep it only if it raises the OOF score
    (cross-fitted over folds when there are two or more, in-sample otherwise). Returns the
    parameters fitted on all of `t` and a report of every score."""
    unknown = set(refinements) - set(REFINEMENTS)
    if unknown:
        raise ValueError(f"unknown refinements {sorted(unknown)}; known: {REFINEMENTS}")
    n_folds = len(np.unique(t.fold))

    def judge(use: frozenset[str]) -> float:
        return cross_fit_score(t, use) if n_folds >= 2 else final(fit_params(t, use).score(t))

    one_hot = np.eye(t.k)
    report: dict[str, Any] = {
        "tiles": len(t.ids),
        "folds": n_folds,
        "validation": "cross-fitted over folds" if n_folds >= 2 else "in-sample (one fold)",
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
    report["blend"] = final(params.score(t))
    report["cities"] = params.score(t)["cities"]
    return params, report
