"""A named family of synthetic sets that look like held-out real cities (tall, sparse, many views).

The split is fixed here, before anything is tuned on them: "tune" sets may steer search spaces
and defaults; "heldout" sets only measure what was chosen (they vary tile size, heights, tiles
per city and views per place so a choice that merely fits the tune sets shows); "check" is one
real-size (2048 px) set for conversion and windowed inference, not for scoring. Seeds differ
between entries, so no set shares a place with another. docs/DATASETS.md lists measured figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geopose_ray.synthetic.build import MIN_SIZE, generate
from geopose_ray.synthetic.planning import DEFAULT_CROP_JITTER, check_views
from geopose_ray.synthetic.styles import style_of

ROLES = ("tune", "heldout", "check")
MAX_VIEWS = 20  # real cities: about this many acquisitions per place
SIZE_STEP = 32  # px: the UNets' deepest stride, so every tile size trains without padding


@dataclass(frozen=True)
class FamilySet:
    """The generate() arguments of one named set, plus its role."""

    role: str  # one of ROLES
    size: int  # px
    per_city: int  # train tiles per city
    test_per_city: int  # test tiles per city (one place each)
    views: int  # train tiles per place
    style: str  # styles.STYLE_SETS name
    seed: int
    zoom: float  # building size (px) and height (m) multiplier
    gsd_jitter: float = 0.0  # relative GSD spread between views of a place
    crop_jitter: float = DEFAULT_CROP_JITTER  # crop offset between views, fraction of the tile


FAMILY: dict[str, FamilySet] = {
    "tune-tall-128": FamilySet("tune", 128, 60, 10, 6, "tall", 1101, 0.5, gsd_jitter=0.03),
    "tune-tall-256": FamilySet("tune", 256, 24, 6, 8, "tall", 1102, 1.0, gsd_jitter=0.03),
    "tune-tall-384": FamilySet("tune", 384, 16, 4, 4, "tall", 1103, 1.2, gsd_jitter=0.03),
    "heldout-128-many": FamilySet("heldout", 128, 200, 20, 20, "tall", 2101, 0.45, gsd_jitter=0.05),
    "heldout-256-single": FamilySet("heldout", 256, 12, 8, 1, "tall", 2102, 1.1),
    "heldout-384-views": FamilySet("heldout", 384, 40, 8, 10, "tall", 2103, 1.3, gsd_jitter=0.05),
    "heldout-512-low": FamilySet("heldout", 512, 24, 6, 4, "gentle", 2104, 2.0, gsd_jitter=0.02),
    "check-2048": FamilySet("check", 2048, 2, 1, 2, "tall", 3101, 2.5, gsd_jitter=0.02),
}


def names(role: str | None = None) -> list[str]:
    """Family names, in table order; only those of `role` when given."""
    return [name for name, spec in FAMILY.items() if role is None or spec.role == role]


def check_set(spec: FamilySet) -> None:
    """ValueError unless `spec` is a set generate() writes and a UNet trains on as it is."""
    if spec.role not in ROLES:
        raise ValueError(f"role {spec.role!r} not in {ROLES}")
    if spec.size < MIN_SIZE or spec.size % SIZE_STEP:
        raise ValueError(f"size {spec.size} px: need >= {MIN_SIZE} and a multiple of {SIZE_STEP}")
    if spec.per_city < 1 or spec.test_per_city < 1 or not 1 <= spec.views <= MAX_VIEWS or spec.zoom <= 0:
        raise ValueError(f"need per_city, test_per_city >= 1, 1 <= views <= {MAX_VIEWS}, zoom > 0: {spec}")
    check_views(spec.views, spec.gsd_jitter, spec.crop_jitter)
    style_of(spec.style)


def generate_named(name: str, out_dir: str | Path) -> Path:
    """Write the family set `name` into `out_dir` (kept when already complete, as generate)."""
    if name not in FAMILY:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(FAMILY)}")
    s = FAMILY[name]
    check_set(s)
    return generate(
        out_dir,
        size=s.size,
        per_city=s.per_city,
        test_per_city=s.test_per_city,
        seed=s.seed,
        zoom=s.zoom,
        views=s.views,
        gsd_jitter=s.gsd_jitter,
        crop_jitter=s.crop_jitter,
        style=s.style,
    )
