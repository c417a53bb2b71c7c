"""The plan of a synthetic set: which tiles, of which places, seen how; drawn from the seed alone.

A place (scene) is seen `views` times in train, each view with its own angle, scale, crop and,
with `gsd_jitter` > 0, its own GSD, as real cities are imaged on several passes. Test places are
seen once each and never appear in train, so the test split measures generalisation to new places.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from geopose_ray.constants import CITIES
from geopose_ray.synthetic.styles import style_of

ID_ALPHABET = string.ascii_letters + string.digits
SPLIT_SEED = {"train": 0, "test": 1}
DEFAULT_VIEWS = 2  # train acquisitions per place (test places: one each)
DEFAULT_CROP_JITTER = 0.125  # crop offset between views, fraction of the tile size
MAX_GSD_JITTER = 0.3  # relative; beyond it a view would hardly show the same place


@dataclass(frozen=True)
class TilePlan:
    """Everything that decides one tile, drawn from the seed before any pixel is rendered."""

    id: str
    city: str
    split: str  # "train" | "test"
    group: str  # scene name, shared by the acquisitions of one scene
    gsd: float  # m/px of this view (the place's GSD unless gsd_jitter > 0)
    scale: float  # px/m of this view's pixels (the VFLOW label)
    angle: float  # rad in [0, 2 pi)
    scene_seed: tuple[int, ...]  # entropy of the scene's geometry
    view: int  # acquisition index within the scene
    place_gsd: float = 0.0  # m/px the scene is built at; 0: same as gsd
    style: str = "gentle"  # style table (styles.STYLE_SETS)
    gsd_jitter: float = 0.0  # the set's relative GSD spread between views (sizes the scene margin)
    crop_jitter: float = DEFAULT_CROP_JITTER  # the set's crop offset between views, fraction of tile

    @property
    def stem(self) -> str:
        return f"{self.city}_{self.id}"

    @property
    def zoom_px(self) -> float:
        """View pixels per scene pixel (> 1: this view is finer than the place's raster)."""
        return (self.place_gsd or self.gsd) / self.gsd


def check_views(views: int, gsd_jitter: float, crop_jitter: float) -> None:
    """ValueError unless the per-view parameters make sense (checked before anything is written)."""
    if views < 1 or not 0.0 <= gsd_jitter <= MAX_GSD_JITTER or not 0.0 <= crop_jitter <= 0.5:
        raise ValueError(
            f"need views >= 1, 0 <= gsd_jitter <= {MAX_GSD_JITTER}, 0 <= crop_jitter <= 0.5; "
            f"got {views}, {gsd_jitter}, {crop_jitter}"
        )


def plan(
    per_city: int = 8,
    test_per_city: int = 2,
    seed: int = 0,
    views: int = DEFAULT_VIEWS,
    gsd_jitter: float = 0.0,
    style: str = "gentle",
    crop_jitter: float = DEFAULT_CROP_JITTER,
) -> list[TilePlan]:
    """The tiles of a set, city by city, train before test; ids unique across the set.

    Train places get `views` consecutive tiles (the last place of a city may get fewer); each
    view's GSD is the place's times 1 + U(-gsd_jitter, gsd_jitter) (relative)."""
    check_views(views, gsd_jitter, crop_jitter)
    styles = style_of(style)
    ids = _ids(np.random.default_rng([seed, 0x1D5]), len(CITIES) * (per_city + test_per_city))
    tiles: list[TilePlan] = []
    for c, city in enumerate(CITIES):
        for split, count, n_views in (("train", per_city, views), ("test", test_per_city, 1)):
            for s in range(-(-count // n_views)):
                scene_seed = (seed, c, SPLIT_SEED[split], s)
                rng = np.random.default_rng([*scene_seed, 0])
                place_gsd = round(float(rng.uniform(*styles[city].gsd)), 4)
                for v in range(min(n_views, count - s * n_views)):
                    gsd = _view_gsd(place_gsd, gsd_jitter, scene_seed, v)
                    tiles.append(
                        TilePlan(
                            id=ids[len(tiles)],
                            city=city,
                            split=split,
                            group=f"{city}_{split}{s:03d}",
                            gsd=gsd,
                            scale=float(rng.uniform(*styles[city].scale)),
                            angle=float(rng.uniform(0.0, 2 * np.pi)),
                            scene_seed=scene_seed,
                            view=v,
                            place_gsd=place_gsd,
                            style=style,
                            gsd_jitter=gsd_jitter,
                            crop_jitter=crop_jitter,
                        )
                    )
    return tiles


def _view_gsd(place_gsd: float, jitter: float, scene_seed: tuple[int, ...], view: int) -> float:
    """m/px of one view; its own stream, so a zero jitter leaves every other draw as it was."""
    if jitter == 0:
        return place_gsd
    rng = np.random.default_rng([*scene_seed, 3, view])
    return round(place_gsd * (1.0 + float(rng.uniform(-jitter, jitter))), 4)


def _ids(rng: np.random.Generator, n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        tile_id = "".join(rng.choice(list(ID_ALPHABET), 6))
        if tile_id not in seen:
            seen.add(tile_id)
            out.append(tile_id)
    return out
