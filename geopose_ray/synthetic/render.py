"""Oblique z-buffer renderer: a ground-plane height field seen by an off-nadir camera.

Physics (docs/GEOPOSE.md, 'Vector flow'): a point of height h on the ground at g appears in the image at
g - vflow(h), vflow = h * scale * (sin a, cos a), x = column, y = row (down). The camera therefore
sits on the +d side, d = (sin a, cos a): roofs lean towards -d, facades facing +d show and the
ground on the -d side of a building is hidden. Along one line of sight the highest surface is
the nearest to the camera, so a z-buffer that keeps the highest splat per pixel is exact.

Every ground point is splatted once at its top (roof, exact height) and once per sub-pixel height
level below it (facade). Within one level the shift is uniform, so layers have no holes. Shading
is a headlight (light from the camera), so the rendering is equivariant under rotations and flips
of the whole scene, which the augmentation tests rely on.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage

LEVEL_STEP_PX = 0.5  # image displacement between facade levels; < 1 px keeps facades gap-free
TOP_TIE = 1e-4  # m: a top splat beats a facade splat of the same height
VIEW_TILT = 0.5  # horizontal part of the (unnormalised) view vector used for roof shading
MAX_SPLATS = 8_000_000  # splats per chunk: ~0.5 GB of temporaries however tall the scene


def render_oblique(
    height: np.ndarray, albedo: np.ndarray, scale: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Render `height` (H, W) float32 m on the ground plane with `albedo` (H, W, 3) in [0, 1].

    Returns the oblique RGB (H, W, 3) uint8 and the AGL of the visible surface in the IMAGE
    frame (H, W) float32 m. `scale` px/m > 0, `angle` rad (0 = down the image, pi/2 = right).
    """
    height, albedo = _check(height, albedo, scale, angle)
    hh, ww = height.shape
    direction = np.array([np.sin(angle), np.cos(angle)])  # (x, y) = (column, row-down)
    best = np.full(hh * ww, -np.inf)  # z-buffer, m (+ TOP_TIE on top splats)
    g_best = np.zeros(hh * ww, np.int64)  # winning splat's ground point, its z (m) and kind
    z_best, top_best = np.zeros(hh * ww), np.zeros(hh * ww, bool)
    for point, z, top in _splat_chunks(height, scale, MAX_SPLATS):  # bounded memory at 2048 px
        shift = z[:, None] * scale * direction[None]  # (N, 2) px (x, y)
        col = point % ww - np.rint(shift[:, 0]).astype(np.int64)
        row = point // ww - np.rint(shift[:, 1]).astype(np.int64)
        inside = (col >= 0) & (col < ww) & (row >= 0) & (row < hh)
        point, z, top = point[inside], z[inside], top[inside]
        key = z + TOP_TIE * top
        win, pixel = _highest(row[inside] * ww + col[inside], key)  # (P,) splat index, (P,) flat pixel
        take = key[win] >= best[pixel]  # ties: the later splat, as within a chunk
        win, pixel = win[take], pixel[take]
        best[pixel], g_best[pixel], z_best[pixel], top_best[pixel] = key[win], point[win], z[win], top[win]
    pixel = np.flatnonzero(best > -np.inf)  # all: every ground point has its own z=0 splat
    g, zw, tw = g_best[pixel], z_best[pixel], top_best[pixel]

    agl = np.zeros(hh * ww, np.float32)  # every pixel gets its own z=0 splat; zeros are a guard
    colour = albedo.reshape(-1, 3).copy()
    shade = _shading(height, scale, direction)
    agl[pixel] = zw
    factor = np.where(
        tw, shade.roof.ravel()[g], _facade_factor(shade.facade.ravel()[g], zw, height.ravel()[g])
    )
    colour[pixel] = albedo.reshape(-1, 3)[g] * factor[:, None]
    rgb = np.clip(np.rint(colour * 255.0), 0, 255).astype(np.uint8).reshape(hh, ww, 3)
    return rgb, agl.reshape(hh, ww)


def _check(
    height: np.ndarray, albedo: np.ndarray, scale: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    height = np.asarray(height, dtype=np.float32)
    albedo = np.asarray(albedo, dtype=np.float32)
    if height.ndim != 2 or albedo.shape != (*height.shape, 3):
        raise ValueError(
            f"height (H, W) and albedo (H, W, 3) expected, got {height.shape} and {albedo.shape}"
        )
    if not np.isfinite(height).all() or (height < 0).any():
        raise ValueError("height must be finite and >= 0 m")
    if not (np.isfinite(scale) and scale > 0 and np.isfinite(angle)):
        raise ValueError(f"scale must be > 0 px/m and angle finite, got {scale}, {angle}")
    return height, albedo


def _splat_chunks(
    height: np.ndarray, scale: float, max_splats: int = MAX_SPLATS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All splats in a fixed order, in chunks of about `max_splats`: one top per ground point,
    then facade levels k*dz < h of the raised points, point by point (flat index, m, is_top)."""
    flat = height.ravel()
    n = flat.size
    yield np.arange(n), flat.astype(np.float64), np.ones(n, bool)
    dz = LEVEL_STEP_PX / scale  # m per level
    raised = np.flatnonzero(flat > 0)
    levels = np.ceil(flat[raised] / dz).astype(np.int64)  # levels 0..n-1 lie strictly below h
    ends = np.cumsum(levels)
    first = 0
    while first < raised.size:  # whole points per chunk (one point alone may exceed max_splats)
        last = max(int(np.searchsorted(ends, ends[first] - levels[first] + max_splats, "right")), first + 1)
        owner = np.repeat(raised[first:last], levels[first:last])
        start = np.cumsum(levels[first:last]) - levels[first:last]
        k = np.arange(owner.size) - np.repeat(start, levels[first:last])
        z = np.minimum((k * dz).astype(np.float32), flat[owner])  # rounding never lifts a level over h
        yield owner, z.astype(np.float64), np.zeros(owner.size, bool)
        first = last


def _highest(target: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the highest splat per target pixel, and those pixels (ties: the last splat)."""
    zbuf = np.full(int(target.max(initial=0)) + 1, -np.inf)
    np.maximum.at(zbuf, target, z)
    best = np.flatnonzero(z == zbuf[target])
    winner = np.full(zbuf.size, -1, np.int64)
    np.maximum.at(winner, target[best], best)
    pixel = np.flatnonzero(winner >= 0)
    return winner[pixel], pixel


class _Shade:
    def __init__(self, roof: np.ndarray, facade: np.ndarray):
        self.roof = roof  # (H, W) factor for top surfaces
        self.facade = facade  # (H, W) factor for facades, before the height term


def _shading(height: np.ndarray, scale: float, direction: np.ndarray) -> _Shade:
    """Headlight shading: surfaces that face the camera (+d) are brighter; facades darker."""
    # Roof slope by minmod (0 at box edges, so flat roofs stay flat up to the rim), px of
    # displacement per px: domes (trees) get rounded shading, boxes a uniform roof.
    sx = _minmod(
        np.diff(height, axis=1, prepend=height[:, :1]), np.diff(height, axis=1, append=height[:, -1:])
    )
    sy = _minmod(np.diff(height, axis=0, prepend=height[:1]), np.diff(height, axis=0, append=height[-1:]))
    sx, sy = sx * scale, sy * scale
    view = np.array([direction[0] * VIEW_TILT, direction[1] * VIEW_TILT, 1.0])
    view /= np.linalg.norm(view)
    cos_roof = (-sx * view[0] - sy * view[1] + view[2]) / np.sqrt(sx**2 + sy**2 + 1.0)
    roof = 0.8 + 0.2 * np.clip(cos_roof, 0.0, 1.0)
    # Facade orientation: outward horizontal normal = -grad of a smoothed height field.
    smooth = ndimage.gaussian_filter(height, 1.0)
    gy, gx = np.gradient(smooth)
    norm = np.hypot(gx, gy) + 1e-6
    facing = np.clip(-(gx * direction[0] + gy * direction[1]) / norm, 0.0, 1.0)
    facade = 0.3 + 0.3 * facing
    return _Shade(roof.astype(np.float32), facade.astype(np.float32))


def _facade_factor(base: np.ndarray, z: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Facades darken towards the ground (ambient occlusion), so height is visible in pixels."""
    return base * (0.75 + 0.25 * z / np.maximum(h, 1e-6))


def _minmod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(a * b > 0, np.sign(a) * np.minimum(np.abs(a), np.abs(b)), 0.0)
