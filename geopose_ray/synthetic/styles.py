"""Style tables: how each city looks, selectable per set.

"gentle" (scene.STYLES, the embedded default) keeps a tile's parallax at ~10% of it, so small
models learn fast. "tall" is the held-out-like look of real cities: sparse buildings (~10% of
the pixels above 2 m) with towers of 30-90 m by city, so that roofs shift by up to about a
third of a 256 px tile (at zoom 1) and a model must learn parallax rather than local texture.
GSD and scale ranges per city follow the real cities: ATL coarsest and tallest, ARG lowest.
"""

from __future__ import annotations

from dataclasses import replace

from geopose_ray.synthetic.scene import STYLES, CityStyle

TALL_STYLES: dict[str, CityStyle] = {
    "ARG": replace(
        STYLES["ARG"],
        scale=(0.65, 1.05),
        gsd=(0.31, 0.41),
        height_median=14.0,
        height_sigma=0.45,
        tower_frac=0.3,
        tower=(16.0, 30.0),
        height_max=30.0,
        footprint=(12.0, 26.0),
        density=0.06,
        trees=8,
    ),
    "ATL": replace(
        STYLES["ATL"],
        scale=(0.60, 0.95),
        gsd=(0.47, 0.59),
        height_median=24.0,
        height_sigma=0.55,
        tower_frac=0.3,
        tower=(35.0, 90.0),
        height_max=90.0,
        footprint=(22.0, 48.0),
        density=0.05,
        trees=15,
    ),
    "JAX": replace(
        STYLES["JAX"],
        scale=(0.70, 1.05),
        gsd=(0.31, 0.39),
        height_median=18.0,
        height_sigma=0.5,
        tower_frac=0.3,
        tower=(25.0, 60.0),
        height_max=60.0,
        footprint=(16.0, 34.0),
        density=0.055,
        trees=10,
    ),
    "OMA": replace(
        STYLES["OMA"],
        scale=(0.60, 1.00),
        gsd=(0.31, 0.36),
        height_median=16.0,
        height_sigma=0.5,
        tower_frac=0.3,
        tower=(20.0, 45.0),
        height_max=45.0,
        footprint=(14.0, 30.0),
        density=0.055,
        trees=12,
    ),
}

STYLE_SETS: dict[str, dict[str, CityStyle]] = {"gentle": STYLES, "tall": TALL_STYLES}


def style_of(name: str) -> dict[str, CityStyle]:
    """The city -> style table called `name`; ValueError names the known ones."""
    try:
        return STYLE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown style {name!r}; known: {', '.join(sorted(STYLE_SETS))}") from None
