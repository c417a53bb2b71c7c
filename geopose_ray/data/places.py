"""Find the places of a data set: which train tiles show the same ground, so folds keep them together.

A city is imaged on several passes, so one place appears in several train tiles (other view
angle, a few % other GSD, another crop). Folds that split a place leak it into validation; the
data has no place column, so places are found here by matching the tiles themselves.

Descriptor (`describe`, per tile, cheap): a pixel p with AGL h has its ground footprint at
p + h * scale * (sin a, cos a) (x = column, y = row down). Splatting every pixel's height to its
footprint, keeping the highest per cell, "undoes" the oblique view: roofs land on their
footprints and facades on their base, so the map is nearly the same from every angle. It is kept
on a GRID x GRID cell raster of the tile, with a second channel: the grey level of ground pixels
(AGL < GROUND_M, facade bases eroded away), which needs no projection and carries the layout of
flat places (roads, lawns) that have no buildings. Statistics are alike across one city's
places, so only layout is compared: normalised cross-correlation (NCC) over translations.

Matching (`group_descriptors`, per city):
  1. coarse: each map block-averaged to COARSE cells, standardised per tile; the cross-correlation
     of every pair over shifts up to MAX_SHIFT of the tile by FFT; each tile keeps its TOP_K best
     partners (a ranking: true partners rank first even where absolute scores overlap).
  2. fine: candidate pairs get the NCC of the GRID maps over the whole overlap of every shift,
     height and grey combined at the same shift, each weighted by how much structure it has
     there (a flat height map counts for nothing, the grey map decides alone).
  3. the threshold, per pair: max(FLOOR, MARGIN + the higher null of its two tiles), a tile's
     null being its best score against the city's maps turned by 90, 180 and 270 degrees, found
     the same way (impostors with the city's very statistics and street-grid orientation that
     can never be the same place): measured on the data itself, per tile, because information
     varies (a tile with one building matches any other one-building tile well, a dense one
     does not). FLOOR only guards cities with few tiles, where the null is a max of few scores.
  4. pairs above their threshold are joined; connected components are the places.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import scipy.fft as sfft
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

GRID = 64  # cells per tile side of the fine descriptor
COARSE = 16  # cells per side of the coarse (ranking) maps
MAX_SHIFT = 0.3  # largest translation between two views, fraction of the tile
WORK_PX = 512  # tiles larger than this are sampled down to about it before projection
GROUND_M = 1.0  # m: pixels below are ground for the grey channel
BLUR_CELLS = 0.7  # Gaussian sigma of the fine maps, cells: tolerance to sub-cell offsets
EPS_HEIGHT = 0.5  # m: height structure below this (per cell std) counts as flat
EPS_GREY = 2.0  # grey levels: ditto for the ground grey
TOP_K = 12  # candidate partners per tile from the coarse ranking
FLOOR = 0.55  # lowest join threshold (fine score): a guard where a city has few tiles
MARGIN = 0.1  # join threshold above the best impostor (null) score
NULL_TURNS = (1, 2, 3)  # quarter turns of the maps that serve as impostors


@dataclass(frozen=True)
class PlaceTile:
    """One train tile as `describe` needs it; `agl` and `rgb` may be zero-argument loaders, so
    that a large set is read one tile at a time (and the record pickles small for a task)."""

    id: str
    city: str
    scale: float  # px/m
    angle: float  # rad, atan2(x, y): x = column, y = row down
    agl: np.ndarray | Callable[[], np.ndarray]  # (H, W) float32 m, NaN = no data
    rgb: np.ndarray | Callable[[], np.ndarray] | None = None  # (H, W, 3) uint8
    gsd: float = 0.0  # m/px; 0 = unknown (no GSD normalisation)


@dataclass(frozen=True)
class Descriptor:
    """A tile's compact, view-independent summary: 2 x GRID^2 float32 (32 KB)."""

    id: str
    city: str
    gsd: float  # m/px, 0 = unknown
    height: np.ndarray  # (GRID, GRID) float32 m, highest ground-projected height per cell
    grey: np.ndarray  # (GRID, GRID) float32 mean grey of ground pixels (the tile's mean where none)


@dataclass
class CityMatch:
    """What matching found in one city: the scored candidate pairs and the threshold used."""

    city: str
    ids: list[str]
    pairs: np.ndarray  # (E, 2) int indices into ids, i < j
    scores: np.ndarray  # (E,) fine score of each pair
    null: np.ndarray  # (N,) each tile's best impostor score (turned maps)
    threshold: np.ndarray  # (E,) the score each pair needed
    places: dict[str, str] = field(default_factory=dict)  # id -> place


def _load(x: np.ndarray | Callable[[], np.ndarray] | None) -> np.ndarray | None:
    return x() if callable(x) else x


def describe(tile: PlaceTile, grid: int = GRID) -> Descriptor:
    """The tile's ground-projected height map and ground grey map (see the module docstring)."""
    agl = np.asarray(_load(tile.agl), np.float32)
    rgb = _load(tile.rgb)
    step = max(1, int(np.ceil(max(agl.shape) / WORK_PX)))  # 2048 px -> every 4th pixel
    agl = agl[step // 2 :: step, step // 2 :: step]  # (h, w) point samples, m
    height = _project_heights(agl, tile.scale * step, tile.angle, grid)  # scale: px of the sampled grid
    if rgb is None:
        grey = np.zeros((grid, grid), np.float32)
    else:
        small = cv2.resize(
            np.asarray(rgb, np.float32).mean(-1), agl.shape[::-1], interpolation=cv2.INTER_AREA
        )
        grey = _ground_grey(agl, small, grid)
    return Descriptor(tile.id, tile.city, float(tile.gsd), height, grey)


def _project_heights(agl: np.ndarray, scale: float, angle: float, grid: int) -> np.ndarray:
    """(grid, grid) float32 m: the highest height splatted to each footprint cell (0: ground or
    unseen). `scale` in px of `agl` per m."""
    h, w = agl.shape
    rows, cols = np.mgrid[0:h, 0:w]
    valid = np.isfinite(agl)
    z = np.where(valid, agl, 0.0)  # m
    x = cols + 0.5 + z * scale * np.sin(angle)  # footprint, px
    y = rows + 0.5 + z * scale * np.cos(angle)
    ci = np.floor(x * (grid / w)).astype(np.int64)
    ri = np.floor(y * (grid / h)).astype(np.int64)
    keep = valid & (ci >= 0) & (ci < grid) & (ri >= 0) & (ri < grid)
    out = np.zeros(grid * grid, np.float32)
    np.maximum.at(out, (ri * grid + ci)[keep], z[keep].astype(np.float32))
    return out.reshape(grid, grid)


def _ground_grey(agl: np.ndarray, grey: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) float32: mean grey of ground pixels per cell. The mask is eroded by a pixel so
    that facade bases (AGL ~0 but view-dependent colour) stay out; cells without ground get the
    tile's ground mean, which the NCC's mean removal turns into "no information"."""
    h, w = agl.shape
    ground = cv2.erode(
        (np.nan_to_num(agl, nan=np.inf) < GROUND_M).astype(np.uint8), np.ones((3, 3), np.uint8)
    )
    rows, cols = np.nonzero(ground)
    cell = (rows * grid // h) * grid + cols * grid // w
    n = np.bincount(cell, minlength=grid * grid)
    total = np.bincount(cell, grey[rows, cols], minlength=grid * grid)
    mean = total.sum() / max(n.sum(), 1)
    return np.where(n > 0, total / np.maximum(n, 1), mean).reshape(grid, grid).astype(np.float32)


def find_places(
    tiles: Iterable[PlaceTile], map_fn: Callable[..., Iterable] = map, workers: int = 1
) -> dict[str, str]:
    """id -> place name ("ARG/p0007") for every tile. `map_fn` (e.g. a parallel map) runs the
    per-tile descriptors, each reading one tile, then the per-city matching; `workers` FFT threads."""
    return group_descriptors(list(map_fn(describe, tiles)), map_fn, workers)


def group_descriptors(
    descriptors: Sequence[Descriptor], map_fn: Callable[..., Iterable] = map, workers: int = 1
) -> dict[str, str]:
    """id -> place of every descriptor; the result does not depend on their order."""
    out: dict[str, str] = {}
    for match in match_cities(descriptors, map_fn, workers):
        out.update(match.places)
    return out


def match_cities(
    descriptors: Sequence[Descriptor], map_fn: Callable[..., Iterable] = map, workers: int = 1
) -> list[CityMatch]:
    """Match city by city through `map_fn` (places never span cities); the full record."""
    by_city: dict[str, list[Descriptor]] = defaultdict(list)
    for d in descriptors:
        by_city[d.city].append(d)
    if len(descriptors) != len({d.id for d in descriptors}):
        raise ValueError("tile ids must be unique")
    cities = [sorted(by_city[c], key=lambda d: d.id) for c in sorted(by_city)]
    return list(map_fn(functools.partial(match_city, workers=workers), cities))


def match_city(descs: Sequence[Descriptor], workers: int = 1) -> CityMatch:
    """Candidates by coarse ranking, fine scores, the calibrated threshold, the components."""
    city = descs[0].city
    ids = [d.id for d in descs]
    height, grey = _normalised_maps(descs)  # (N, G, G) each
    fine = _FineMaps(height, grey, workers)
    coarse = _coarse_maps(height, grey)
    pairs = _candidates(_coarse_scores(coarse, coarse, workers, upper=True), TOP_K)
    scores = fine.score(pairs[:, 0], pairs[:, 1])
    null = _null_scores(height, grey, fine, coarse, workers)
    threshold = np.maximum(FLOOR, np.maximum(null[pairs[:, 0]], null[pairs[:, 1]]) + MARGIN)
    joined = pairs[scores >= threshold]
    n = len(ids)
    graph = coo_matrix((np.ones(len(joined)), (joined[:, 0], joined[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = {lab: k for k, lab in enumerate(dict.fromkeys(label.tolist()))}  # by first (smallest) id
    places = {tile_id: f"{city}/p{order[lab]:04d}" for tile_id, lab in zip(ids, label.tolist())}
    return CityMatch(city, ids, pairs, scores, null, threshold, places)


def _normalised_maps(descs: Sequence[Descriptor]) -> tuple[np.ndarray, np.ndarray]:
    """(N, G, G) float64 height and grey maps, resampled to the city's median GSD (a view with a
    coarser GSD covers more ground per cell, so its map is magnified about the centre) and with
    each tile's mean removed (NCC ignores it; float64 sums of squares then lose no precision)."""
    gsds = np.array([d.gsd for d in descs])
    ref = float(np.median(gsds[gsds > 0])) if (gsds > 0).any() else 0.0
    height = np.stack([_zoomed(d.height, d.gsd / ref if d.gsd > 0 and ref > 0 else 1.0) for d in descs])
    grey = np.stack([_zoomed(d.grey, d.gsd / ref if d.gsd > 0 and ref > 0 else 1.0) for d in descs])
    height, grey = height.astype(np.float64), grey.astype(np.float64)
    return height - height.mean((1, 2), keepdims=True), grey - grey.mean((1, 2), keepdims=True)


def _zoomed(x: np.ndarray, zoom: float) -> np.ndarray:
    """`x` magnified by `zoom` about its centre, same shape; uncovered cells get its mean."""
    if abs(zoom - 1.0) < 1e-3:
        return x
    g = x.shape[0]
    affine = cv2.getRotationMatrix2D((g / 2.0 - 0.5, g / 2.0 - 0.5), 0.0, zoom)
    return cv2.warpAffine(
        x, affine, (g, g), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=float(x.mean())
    )


def _coarse_maps(height: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """(N, 2, COARSE, COARSE): block means, each tile and channel standardised (flat: ~0)."""
    n, g, _ = height.shape
    f = g // COARSE
    out = []
    for x, eps in ((height, EPS_HEIGHT), (grey, EPS_GREY)):
        x = x[:, : f * COARSE, : f * COARSE].reshape(n, COARSE, f, COARSE, f).mean((2, 4))
        x = x - x.mean((1, 2), keepdims=True)
        out.append(x / np.sqrt((x**2).mean((1, 2), keepdims=True) + eps**2))
    return np.stack(out, 1).astype(np.float32)


def _lags(p: int, m: int) -> np.ndarray:
    """Indices of lags -m..m in a circular correlation of length p."""
    return np.r_[np.arange(p - m, p), np.arange(0, m + 1)]


def _overlap_cells(g: int, m: int) -> np.ndarray:
    """(2m+1, 2m+1) cells shared by two g x g maps at each shift."""
    side = g - np.abs(np.arange(-m, m + 1))
    return (side[:, None] * side[None, :]).astype(np.float64)


def _coarse_scores(query: np.ndarray, ref: np.ndarray, workers: int, upper: bool = False) -> np.ndarray:
    """(Nq, Nr) best mean correlation over shifts up to MAX_SHIFT. `upper`: query is ref and only
    pairs j > i are computed (half the work); the result is symmetric, -inf on the diagonal."""
    g = query.shape[-1]
    m = round(MAX_SHIFT * g)
    p = sfft.next_fast_len(g + m, real=True)  # zero padding: no wrap-around for |lag| <= m
    fq = sfft.rfft2(query, (p, p), workers=workers)  # (Nq, C, p, p // 2 + 1)
    conj = np.conj(fq if upper else sfft.rfft2(ref, (p, p), workers=workers)).transpose(1, 0, 2, 3).copy()
    lags, cells = _lags(p, m), _overlap_cells(g, m) * query.shape[1]
    out = np.full((len(query), len(ref)), -np.inf, np.float32)
    for i in range(len(query) - upper):
        start = i + 1 if upper else 0
        spec, part = conj[0, start:] * fq[i, 0], np.empty_like(conj[0, start:])  # (Nr', p, p // 2 + 1)
        for c in range(1, len(conj)):  # summed over channels in place: the loop's hot spot
            spec += np.multiply(conj[c, start:], fq[i, c], out=part)
        cc = sfft.irfft2(spec, (p, p), workers=workers)
        out[i, start:] = (cc[:, lags][:, :, lags] / cells).reshape(len(cc), -1).max(-1)
    if upper:
        out = np.maximum(out, out.T)
    return out


def _candidates(scores: np.ndarray, k: int, symmetric: bool = True) -> np.ndarray:
    """(E, 2) pairs (i, j) where j is among i's k best (or, `symmetric`, i among j's), i < j
    when symmetric; rows sorted, so the order of the result is fixed."""
    n, m = scores.shape
    k = min(k, m)
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < m else np.tile(np.arange(m), (n, 1))
    rows = np.repeat(np.arange(n), k)
    cols = best.ravel()
    keep = np.isfinite(scores[rows, cols])
    pairs = np.stack([rows[keep], cols[keep]], 1)
    if symmetric:
        pairs = np.sort(pairs, 1)
    return np.unique(pairs, axis=0).reshape(-1, 2)


class _FineMaps:
    """The fine maps of a city, blurred, with their FFTs and per-shift overlap sums precomputed,
    so that a pair's full-overlap NCC over all shifts costs one inverse FFT per channel."""

    def __init__(self, height: np.ndarray, grey: np.ndarray, workers: int):
        g = height.shape[-1]
        self.m = round(MAX_SHIFT * g)
        self.p = sfft.next_fast_len(g + self.m, real=True)
        self.workers = workers
        self.cells = _overlap_cells(g, self.m)  # (S, S) cells per shift
        self.eps2 = (EPS_HEIGHT**2, EPS_GREY**2)
        self.channels = []
        for x in (height, grey):
            x = np.stack([cv2.GaussianBlur(np.ascontiguousarray(t), (0, 0), BLUR_CELLS) for t in x])
            spec = sfft.rfft2(x.astype(np.float32), (self.p, self.p), workers=workers)
            self.channels.append((spec, *_shift_sums(x, self.m)))

    def score(
        self, a: np.ndarray, b: np.ndarray, other: _FineMaps | None = None, chunk: int = 256
    ) -> np.ndarray:
        """(E,) best combined NCC of maps a[e] (self) and b[e] (`other`, default self) over shifts."""
        other = other or self
        out = np.empty(len(a), np.float32)
        for s in range(0, len(a), chunk):
            out[s : s + chunk] = self._score(a[s : s + chunk], b[s : s + chunk], other)
        return out

    def _score(self, a: np.ndarray, b: np.ndarray, other: _FineMaps) -> np.ndarray:
        lags, cells = _lags(self.p, self.m), self.cells
        total = np.zeros((len(a), *cells.shape))
        weight = np.zeros_like(total)
        for (fa, sa, qa), (fb, sb, qb), eps2 in zip(self.channels, other.channels, self.eps2):
            cc = sfft.irfft2(fa[a] * np.conj(fb[b]), (self.p, self.p), workers=self.workers)
            cc = cc[:, lags][:, :, lags].astype(np.float64)  # (E, S, S): sum A(x + d) B(x)
            sb_, qb_ = sb[b][:, ::-1, ::-1], qb[b][:, ::-1, ::-1]  # B's overlap sits at shift -d
            va = np.maximum(qa[a] - sa[a] ** 2 / cells, 0.0)  # sums of squared deviations
            vb = np.maximum(qb_ - sb_**2 / cells, 0.0)
            reg = np.sqrt((va + cells * eps2) * (vb + cells * eps2))
            total += (cc - sa[a] * sb_ / cells) / reg  # the NCC times this channel's weight
            weight += np.sqrt(va * vb) / reg  # in [0, 1): ~0 where either map is flat
        return (total / np.maximum(weight, 1.0)).reshape(len(a), -1).max(-1)


def _shift_sums(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2m+1, 2m+1) sums of x and x^2 over the part of each map that overlaps a copy shifted
    by d (rows and columns [max(0, d), g + min(0, d))), from integral images."""
    n, g, _ = x.shape
    d = np.arange(-m, m + 1)
    lo, hi = np.maximum(0, d), np.minimum(g, g + d)
    out = []
    for v in (x, x * x):
        ii = np.zeros((n, g + 1, g + 1))
        ii[:, 1:, 1:] = v.cumsum(1).cumsum(2)
        out.append(
            ii[:, hi[:, None], hi[None, :]]
            - ii[:, lo[:, None], hi[None, :]]
            - ii[:, hi[:, None], lo[None, :]]
            + ii[:, lo[:, None], lo[None, :]]
        )
    return out[0], out[1]


def _null_scores(
    height: np.ndarray, grey: np.ndarray, fine: _FineMaps, coarse: np.ndarray, workers: int
) -> np.ndarray:
    """(N,) per tile the best fine score against the city's maps turned by NULL_TURNS quarter
    turns, found as real partners are (coarse ranking, then fine): what an impostor reaches
    against this tile. A turn keeps a map's statistics and street-grid orientation (grids are
    square) but never shows the same place; several turns sample more impostors than a city
    has tiles, so the best real impostor rarely beats them by much."""
    out = np.full(len(height), -np.inf, np.float32)
    for k in NULL_TURNS:
        turned = _FineMaps(np.rot90(height, k, (1, 2)), np.rot90(grey, k, (1, 2)), workers)
        ranked = _coarse_scores(coarse, np.rot90(coarse, k, (2, 3)), workers)
        pairs = _candidates(ranked, TOP_K, symmetric=False)
        np.maximum.at(out, pairs[:, 0], fine.score(pairs[:, 0], pairs[:, 1], other=turned))
    return out


def pair_precision_recall(found: dict[str, str], truth: dict[str, str]) -> tuple[float, float]:
    """(precision, recall) over pairs of the tiles in `truth`: precision = share of pairs put in
    one place that truly share one, recall = share of true same-place pairs put together
    (1.0 where there is nothing to share)."""
    from sklearn.metrics.cluster import pair_confusion_matrix  # ~1 s import: not at module import

    ids = sorted(truth)
    cm = pair_confusion_matrix([truth[i] for i in ids], [found[i] for i in ids])
    tp, fn, fp = cm[1, 1], cm[1, 0], cm[0, 1]
    return (float(tp / (tp + fp)) if tp + fp else 1.0, float(tp / (tp + fn)) if tp + fn else 1.0)
