"""Per-city synthetic scenes on the ground plane: roads, box buildings and dome trees.

Each city has its own height distribution, footprint sizes, density and palette (docs/GEOPOSE.md,
'Data layout': ARG low, ATL tallest and coarsest GSD), so city, height and scale are learnable.
Lengths are in pixels of the output tile and heights in metres, both multiplied by `zoom`
(grows with the tile size) so a building's displacement stays a few to ~20 px at 64-256 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

RGB = tuple[float, float, float]
REFERENCE_SIZE = 256  # px: the tile size at which CityStyle lengths and heights hold as written
REFERENCE_GSD = 0.35  # m/px: footprints shrink in px for cities with a coarser GSD


@dataclass(frozen=True)
class CityStyle:
    scale: tuple[float, float]  # px/m, uniform per tile
    gsd: tuple[float, float]  # m/px, uniform per scene
    height_median: float  # m, lognormal body of building heights
    height_sigma: float  # log-space spread
    tower_frac: float  # share of tall buildings
    tower: tuple[float, float]  # m, uniform tower heights
    height_max: float  # m, hard cap (sets the render margin)
    footprint: tuple[float, float]  # px, building side lengths
    density: float  # target share of the ground covered by buildings
    trees: int  # trees per 256 x 256 px
    tree_height: tuple[float, float]  # m
    tree_radius: tuple[float, float]  # px
    roofs: tuple[RGB, ...]
    ground: tuple[RGB, ...]
    road: RGB
    tree: RGB


STYLES: dict[str, CityStyle] = {
    "ARG": CityStyle(
        scale=(0.65, 1.05),
        gsd=(0.31, 0.41),
        height_median=4.5,
        height_sigma=0.3,
        tower_frac=0.03,
        tower=(8.0, 12.0),
        height_max=12.0,
        footprint=(7.0, 16.0),
        density=0.38,
        trees=25,
        tree_height=(3.0, 7.0),
        tree_radius=(2.5, 5.0),
        roofs=((0.72, 0.36, 0.24), (0.80, 0.50, 0.30), (0.62, 0.56, 0.46), (0.55, 0.30, 0.22)),
        ground=((0.52, 0.45, 0.36), (0.46, 0.42, 0.33)),
        road=(0.36, 0.33, 0.30),
        tree=(0.30, 0.38, 0.20),
    ),
    "ATL": CityStyle(
        scale=(0.60, 0.95),
        gsd=(0.47, 0.59),
        height_median=7.0,
        height_sigma=0.45,
        tower_frac=0.22,
        tower=(14.0, 24.0),
        height_max=24.0,
        footprint=(14.0, 36.0),
        density=0.22,
        trees=70,
        tree_height=(5.0, 12.0),
        tree_radius=(3.0, 6.5),
        roofs=((0.78, 0.78, 0.80), (0.45, 0.46, 0.50), (0.90, 0.90, 0.88), (0.30, 0.31, 0.34)),
        ground=((0.40, 0.45, 0.36), (0.44, 0.44, 0.40)),
        road=(0.42, 0.42, 0.43),
        tree=(0.12, 0.30, 0.12),
    ),
    "JAX": CityStyle(
        scale=(0.70, 1.10),
        gsd=(0.31, 0.39),
        height_median=5.0,
        height_sigma=0.4,
        tower_frac=0.10,
        tower=(10.0, 18.0),
        height_max=18.0,
        footprint=(10.0, 26.0),
        density=0.26,
        trees=45,
        tree_height=(4.0, 9.0),
        tree_radius=(2.5, 5.5),
        roofs=((0.88, 0.84, 0.74), (0.92, 0.92, 0.92), (0.66, 0.74, 0.80), (0.80, 0.70, 0.58)),
        ground=((0.70, 0.64, 0.50), (0.62, 0.60, 0.48)),
        road=(0.58, 0.58, 0.56),
        tree=(0.22, 0.45, 0.20),
    ),
    "OMA": CityStyle(
        scale=(0.60, 1.00),
        gsd=(0.31, 0.36),
        height_median=5.5,
        height_sigma=0.4,
        tower_frac=0.08,
        tower=(10.0, 20.0),
        height_max=20.0,
        footprint=(9.0, 24.0),
        density=0.28,
        trees=55,
        tree_height=(4.0, 10.0),
        tree_radius=(3.0, 6.0),
        roofs=((0.35, 0.30, 0.28), (0.42, 0.42, 0.44), (0.50, 0.38, 0.30), (0.26, 0.27, 0.30)),
        ground=((0.36, 0.50, 0.28), (0.40, 0.48, 0.32)),
        road=(0.48, 0.48, 0.47),
        tree=(0.18, 0.36, 0.14),
    ),
}


@dataclass
class Scene:
    height: np.ndarray  # (N, N) float32 m on the ground plane
    albedo: np.ndarray  # (N, N, 3) float32 in [0, 1]


def zoom_for(size: int) -> float:
    """Length/height multiplier: sub-linear in tile size, so 64 px tiles keep a few px of parallax."""
    return float(np.sqrt(size / REFERENCE_SIZE))


def make_scene(rng: np.random.Generator, style: CityStyle, n_px: int, gsd: float, zoom: float) -> Scene:
    """A square patch of city `n_px` wide: ground, a rotated road grid, buildings, trees."""
    ground = np.asarray(style.ground[rng.integers(len(style.ground))], np.float32)
    grain = _grain(rng, n_px)  # shared fine noise: the masks below are disjoint
    albedo = ground + _blotches(rng, n_px, sigma=8.0 * zoom, amp=0.06) + 0.02 * grain
    height = np.zeros((n_px, n_px), np.float32)
    grid_angle = rng.uniform(0, np.pi / 2)
    road = _roads(rng, n_px, grid_angle, zoom)
    albedo[road] = np.asarray(style.road, np.float32) + 0.015 * grain[road]
    _add_buildings(rng, style, (height, albedo), road, grid_angle, zoom, zoom * REFERENCE_GSD / gsd)
    _add_trees(rng, style, (height, albedo), road, zoom, 0.035 * grain)
    return Scene(height=height, albedo=np.clip(albedo, 0.0, 1.0))


def _grain(rng: np.random.Generator, n_px: int) -> np.ndarray:
    """(N, N, 3) unit per-pixel noise, mostly brightness with a little colour."""
    noise = rng.standard_normal((n_px, n_px, 4), dtype=np.float32)
    return noise[..., :1] + 0.3 * noise[..., 1:]


def _blotches(rng: np.random.Generator, n_px: int, sigma: float, amp: float) -> np.ndarray:
    """(N, N, 3) smooth colour noise (lawns, soil) of std ~`amp`, built on a coarse grid: cheap."""
    step = max(1, int(sigma // 2))
    coarse = ndimage.gaussian_filter(
        rng.standard_normal((n_px // step + 2, n_px // step + 2, 4)), (sigma / step, sigma / step, 0)
    )
    fine = ndimage.zoom(coarse, (step, step, 1), order=1)[:n_px, :n_px].astype(np.float32)
    fine /= fine.std() + 1e-6
    return amp * (fine[..., :1] + 0.3 * fine[..., 1:])


def _rotated(n_px: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (u, v) in a frame rotated by `angle`."""
    y, x = np.mgrid[0:n_px, 0:n_px].astype(np.float32)
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def _roads(rng: np.random.Generator, n_px: int, angle: float, zoom: float) -> np.ndarray:
    """(N, N) bool: a road grid with random spacing, width and offset."""
    u, v = _rotated(n_px, angle)
    spacing = rng.uniform(70, 120, 2) * zoom
    width = rng.uniform(4, 8) * zoom
    offset = rng.uniform(0, spacing)
    return ((u - offset[0]) % spacing[0] < width) | ((v - offset[1]) % spacing[1] < width)


def _add_buildings(
    rng: np.random.Generator,
    style: CityStyle,
    layers: tuple[np.ndarray, np.ndarray],
    road: np.ndarray,
    grid_angle: float,
    zoom: float,
    px_zoom: float,
) -> None:
    """Rejection-sample non-overlapping rotated boxes until the city's density is reached.

    `layers` = (height (N, N) m, albedo (N, N, 3)), edited in place; heights scale with `zoom`,
    footprints with `px_zoom` (zoom and GSD).
    """
    height, albedo = layers
    n_px = height.shape[0]
    blocked = ndimage.binary_dilation(road, iterations=2)  # footprints keep 2 px from roads and each other
    target = style.density * n_px * n_px
    covered = 0
    mean_area = (np.mean(style.footprint) * px_zoom) ** 2  # px
    for _ in range(int(8 * target / mean_area) + 20):  # attempts: dense cities stop short of target
        if covered >= target:
            break
        sides = rng.uniform(*style.footprint, 2) * px_zoom / 2  # half lengths, px
        theta = grid_angle + rng.normal(0, 0.08)
        centre = rng.uniform(0, n_px, 2)
        if blocked[int(centre[1]), int(centre[0])]:
            continue
        window, mask = _box(centre, sides, theta, n_px, pad=2)
        if mask is None or blocked[window][mask].any():
            continue
        h = _building_height(rng, style) * zoom
        height[window][mask] = h
        roof = np.asarray(style.roofs[rng.integers(len(style.roofs))], np.float32)
        roof = roof + rng.normal(0, 0.03, 3).astype(np.float32)
        albedo[window][mask] = roof + rng.normal(0, 0.015, (int(mask.sum()), 3)).astype(np.float32)
        blocked[window] |= ndimage.binary_dilation(mask, iterations=2)
        covered += int(mask.sum())


def _box(
    centre: np.ndarray, half: np.ndarray, theta: float, n_px: int, pad: int
) -> tuple[tuple[slice, slice], np.ndarray | None]:
    """Rasterise a rotated rectangle; returns its bounding window (`pad` px spare) and mask in it."""
    reach = int(np.ceil(np.hypot(*half))) + 1 + pad
    cx, cy = int(centre[0]), int(centre[1])
    r0, r1 = max(cy - reach, 0), min(cy + reach + 1, n_px)
    c0, c1 = max(cx - reach, 0), min(cx + reach + 1, n_px)
    y, x = np.ogrid[r0:r1, c0:c1]
    dx, dy = x + 0.5 - centre[0], y + 0.5 - centre[1]  # (1, w), (h, 1) px
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    mask = (np.abs(u) <= half[0]) & (np.abs(v) <= half[1])
    return (slice(r0, r1), slice(c0, c1)), (mask if mask.any() else None)


def _building_height(rng: np.random.Generator, style: CityStyle) -> float:
    """Metres at the reference tile size: a lognormal body plus a share of towers."""
    if rng.random() < style.tower_frac:
        h = rng.uniform(*style.tower)
    else:
        h = style.height_median * np.exp(rng.normal(0, style.height_sigma))
    return float(np.clip(h, 2.0, style.height_max))


def _add_trees(
    rng: np.random.Generator,
    style: CityStyle,
    layers: tuple[np.ndarray, np.ndarray],
    road: np.ndarray,
    zoom: float,
    leaf: np.ndarray,
) -> None:
    """Dome-shaped green canopies on open ground (never on roads or roofs); edits `layers`.

    `leaf` (N, N, 3) is the canopy texture added to the tree colour."""
    height, albedo = layers
    n_px = height.shape[0]
    count = rng.poisson(style.trees * (n_px / REFERENCE_SIZE) ** 2)
    free = ~road & (height == 0)
    y, x = np.mgrid[0:n_px, 0:n_px].astype(np.float32)
    for _ in range(count):
        cx, cy = rng.uniform(0, n_px, 2)
        if not free[int(cy), int(cx)]:
            continue
        radius = rng.uniform(*style.tree_radius) * zoom
        top = rng.uniform(*style.tree_height) * zoom
        r0, r1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, n_px)
        c0, c1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, n_px)
        win = (slice(r0, r1), slice(c0, c1))
        rho2 = ((x[win] + 0.5 - cx) ** 2 + (y[win] + 0.5 - cy) ** 2) / radius**2
        dome = (top * np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))).astype(np.float32)
        mask = (dome > 0.15 * top) & free[win]
        colour = np.asarray(style.tree, np.float32) * rng.uniform(0.8, 1.2)
        height[win][mask] = np.maximum(height[win][mask], dome[mask])
        albedo[win][mask] = colour + leaf[win][mask]
        free[win] &= ~mask
