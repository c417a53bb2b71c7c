"""From a tile's plan to pixels: the place's scene, the oblique rendering, the view's crop.

A scene is rendered at its place's GSD; a view with another GSD resamples its crop by
place_gsd / view_gsd, so its pixels, its AGL and its VFLOW scale (px/m of the view) agree.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from geopose_ray.synthetic.planning import TilePlan
from geopose_ray.synthetic.render import render_oblique
from geopose_ray.synthetic.scene import Scene, make_scene, zoom_for
from geopose_ray.synthetic.styles import style_of

NODATA_FRAC = (0.001, 0.005)  # share of AGL pixels without a (simulated) lidar return
NOISE_STD = 3.0  # uint8 levels of sensor noise


def crop_px(tile: TilePlan, size: int) -> int:
    """Largest crop offset between views, px (size // 8 with the default fraction)."""
    return int(size * tile.crop_jitter)


def margin(tile: TilePlan, size: int, zoom: float) -> int:
    """px of scene around the tile: the largest parallax, the crop jitter and, when views differ
    in GSD, the extra ground a coarser view covers."""
    style = style_of(tile.style)[tile.city]
    if tile.gsd_jitter == 0:
        return int(np.ceil(style.height_max * zoom * style.scale[1])) + crop_px(tile, size) + 2
    stretch = 1.0 + tile.gsd_jitter  # at most this many scene px per view px, and scale factor
    parallax = int(np.ceil(style.height_max * zoom * style.scale[1] * stretch))  # scene px
    return parallax + crop_px(tile, size) + int(np.ceil(size * tile.gsd_jitter / 2)) + 2


def scene_for(tile: TilePlan, size: int, zoom: float | None = None) -> Scene:
    """The ground-plane scene of `tile` (shared by all acquisitions of its group); `zoom`
    multiplies lengths and heights (None: `zoom_for(size)`)."""
    zoom = zoom_for(size) if zoom is None else zoom
    n_px = size + 2 * margin(tile, size, zoom)
    rng = np.random.default_rng([*tile.scene_seed, 1])
    style = style_of(tile.style)[tile.city]
    return make_scene(rng, style, n_px, tile.place_gsd or tile.gsd, zoom)


def render_tile(
    tile: TilePlan, size: int, scene: Scene | None = None, zoom: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 RGB with noise and (size, size) float32 AGL m in the image frame
    with NaN no-data. The scene is larger than the tile, so parallax enters from outside."""
    zoom = zoom_for(size) if zoom is None else zoom
    scene = scene if scene is not None else scene_for(tile, size, zoom)
    origin, jitter = margin(tile, size, zoom), crop_px(tile, size)
    rgb, agl = render_oblique(scene.height, scene.albedo, tile.scale / tile.zoom_px, tile.angle)
    rng = np.random.default_rng([*tile.scene_seed, 2, tile.view])
    r0, c0 = origin + rng.integers(-jitter, jitter + 1, 2)
    if tile.zoom_px == 1.0:
        rgb, agl = rgb[r0 : r0 + size, c0 : c0 + size], agl[r0 : r0 + size, c0 : c0 + size].copy()
    else:
        rgb, agl = _resampled(rgb, agl, (r0, c0), size, tile.zoom_px)
    noisy = rgb * rng.uniform(0.92, 1.08) + rng.normal(0.0, NOISE_STD, rgb.shape)
    rgb = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    n_nodata = max(1, round(rng.uniform(*NODATA_FRAC) * size * size))
    agl.ravel()[rng.choice(size * size, n_nodata, replace=False)] = np.nan
    return rgb, agl


def _resampled(
    rgb: np.ndarray, agl: np.ndarray, corner: tuple[int, int], size: int, zoom_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """The view of `size` px whose centre is that of the unscaled crop at `corner` (scene px),
    `zoom_px` view px per scene px: RGB bilinear (float), AGL nearest (heights of real surfaces)."""
    centre = np.asarray(corner, np.float64) + size / 2.0  # scene px, edges at integers
    axis = (np.arange(size) + 0.5 - size / 2.0) / zoom_px  # scene px from the centre
    rows = (centre[0] + axis - 0.5)[:, None] * np.ones(size)  # pixel-centre coordinates
    cols = (centre[1] + axis - 0.5)[None, :] * np.ones((size, 1))
    grid = np.stack([rows, cols])
    colour = np.stack(
        [ndimage.map_coordinates(rgb[..., k].astype(np.float32), grid, order=1) for k in range(3)], -1
    )
    return colour, ndimage.map_coordinates(agl, grid, order=0).astype(np.float32)
