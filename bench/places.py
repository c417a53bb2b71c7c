"""Bench: finding places (`data.places`) on synthetic sets whose places are known.

    python bench/places.py [--quick] [--data DIR ...] [--sets s128 s256 ...] [--no-rgb] [--scale 1500]

Each set is generated once in the bench folder (or taken from --data, a DrivenData layout with
a `group` column), its train tiles are read from the original files, and `find_places` runs with
the group column hidden. One JSON line per set: pair precision and recall (goal: both >= 0.95;
`ratio` = the smaller), tiles, seconds to describe and to match, and what justifies the
thresholds: per city the median tile null (best impostor score) and pair threshold, the lowest
score of a true pair and the highest of a false pair among the scored candidates, the same
relative to each pair's threshold (a false pair at >= 0 is a false join, a true pair < 0 a
missed one), and the share of true pairs that the coarse ranking put among the candidates.
`--scale N` times matching N tiles of one city (random maps: the work does not depend on
content) and describing one 2048 px tile. `--no-rgb` matches on heights alone.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench import common
from geopose_ray.data import io, layout, places
from geopose_ray.errors import run_cli

GOAL = (">=", 0.95)
# name -> generate() keywords; sets whose keywords the generator lacks are skipped
SETS: dict[str, dict[str, Any]] = {
    "s128": {"size": 128, "per_city": 60},  # the embedded default
    "s256": {"size": 256, "per_city": 60},
    "s512": {"size": 512, "per_city": 60},
    "s128_v4_gsd": {"size": 128, "per_city": 60, "views": 4, "gsd_jitter": 0.05},
    "s256_v6_gsd": {"size": 256, "per_city": 60, "views": 6, "gsd_jitter": 0.05},
    "s256_tall_v3": {"size": 256, "per_city": 60, "views": 3, "gsd_jitter": 0.05, "style": "tall"},
    "s128_x300_v3": {"size": 128, "per_city": 300, "views": 3, "gsd_jitter": 0.05},
    "s128_v20_gsd": {"size": 128, "per_city": 100, "views": 20, "gsd_jitter": 0.05},  # > TOP_K views
}
QUICK_SETS = ("s128", "s128_v4_gsd")


def make_set(work: Path, name: str) -> Path | None:
    """The named synthetic set in the bench folder (generated once); None when the generator
    does not take its keywords."""
    from geopose_ray.synthetic import generate

    kwargs = {**SETS[name], "test_per_city": 0, "seed": 0}
    if not set(kwargs) <= set(inspect.signature(generate).parameters):
        return None
    return generate(work / f"places_{name}", **kwargs)


def tiles_of(data_dir: Path, rgb: bool = True) -> tuple[list[places.PlaceTile], dict[str, str]]:
    """The set's train tiles (files read lazily; without RGB unless `rgb`) and the true place of
    each (`group`)."""
    tiles, truth = [], {}
    for s in layout.load_split(data_dir, "train"):
        vflow = io.read_vflow(s.vflow)
        tiles.append(
            places.PlaceTile(
                id=s.id,
                city=s.city,
                scale=vflow.scale,
                angle=vflow.angle,
                agl=functools.partial(io.read_agl, s.agl),
                rgb=functools.partial(io.read_rgb, s.rgb) if rgb else None,
                gsd=s.gsd,
            )
        )
        truth[s.id] = f"{s.city}/{s.group or s.id}"
    return tiles, truth


def evaluate(name: str, data_dir: Path, rgb: bool = True) -> dict[str, Any]:
    """find_places on one set (describe and match timed apart) against its groups."""
    tiles, truth = tiles_of(data_dir, rgb)
    t0 = time.perf_counter()
    descriptors = [places.describe(t) for t in tiles]
    t1 = time.perf_counter()
    matches = places.match_cities(descriptors)
    t2 = time.perf_counter()
    found = {k: v for m in matches for k, v in m.places.items()}
    precision, recall = places.pair_precision_recall(found, truth)
    return {
        "set": name,
        "rgb": rgb,
        "precision": precision,
        "recall": recall,
        "tiles": len(tiles),
        "places_true": len(set(truth.values())),
        "places_found": len(set(found.values())),
        "describe_s": t1 - t0,
        "match_s": t2 - t1,
        "cities": {m.city: city_details(m, truth) for m in matches},
    }


def city_details(match: places.CityMatch, truth: dict[str, str]) -> dict[str, Any]:
    """Threshold, null and the score ranges of true and false candidate pairs in one city."""
    label = np.array([truth[i] for i in match.ids])
    same = label[match.pairs[:, 0]] == label[match.pairs[:, 1]]
    n_true = sum(c * (c - 1) // 2 for c in np.unique(label, return_counts=True)[1])
    over = match.scores - match.threshold  # > 0: joined
    return {
        "null_median": float(np.median(match.null)),
        "threshold_median": float(np.median(match.threshold)) if len(over) else None,
        "true_min": float(match.scores[same].min()) if same.any() else None,
        "false_max": float(match.scores[~same].max()) if (~same).any() else None,
        "true_over_min": float(over[same].min()) if same.any() else None,  # < 0: a missed pair
        "false_over_max": float(over[~same].max()) if (~same).any() else None,  # >= 0: a false join
        "candidate_recall": float(same.sum() / n_true) if n_true else 1.0,
    }


def scale_timing(n: int, seed: int = 0) -> dict[str, Any]:
    """Seconds to match n tiles of one city (random smooth maps) and to describe a 2048 px tile."""
    import cv2

    rng = np.random.default_rng(seed)
    g = places.GRID

    def smooth(sigma: float) -> np.ndarray:
        return cv2.GaussianBlur(rng.standard_normal((g, g)).astype(np.float32), (0, 0), sigma)

    descs = [
        places.Descriptor(f"t{i:05d}", "ARG", 0.3, np.maximum(smooth(1.5) * 8, 0), smooth(2.0) * 20 + 120)
        for i in range(n)
    ]
    t0 = time.perf_counter()
    places.match_cities(descs)
    match_s = time.perf_counter() - t0
    agl = np.maximum(rng.normal(0, 5, (2048, 2048)), 0).astype(np.float32)
    rgb = rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    places.describe(places.PlaceTile("x", "ARG", 2.0, 1.0, agl, rgb, 0.3))
    return {
        "set": f"scale_{n}",
        "tiles": n,
        "match_s": match_s,
        "describe_2048px_s": time.perf_counter() - t0,
    }


def run(args: Any) -> None:
    work = common.work_dir(args.work)
    sets: list[tuple[str, Path | None]] = [(Path(d).name, Path(d)) for d in args.data or []]
    if args.data is None:  # `--sets` with no name: none (e.g. with --scale alone)
        names = args.sets if args.sets is not None else (QUICK_SETS if args.quick else list(SETS))
        sets = [(name, make_set(work, name)) for name in names]
    for name, data_dir in sets:
        if data_dir is None:
            common.emit("places", float("nan"), set=name, skipped="the generator lacks its keywords")
            continue
        result = evaluate(name, data_dir, rgb=not args.no_rgb)
        ratio = min(result["precision"], result["recall"])
        common.emit("places", ratio, goal_met=common.goal_met(ratio, *GOAL), **result)
    if args.scale:
        common.emit("places", float("nan"), **scale_timing(args.scale))


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--data", nargs="*", type=Path, help="data sets with a group column (instead of generated)"
    )
    p.add_argument("--sets", nargs="*", choices=sorted(SETS), help="generated sets (default: all)")
    p.add_argument("--no-rgb", action="store_true", help="match on heights alone (no ground grey)")
    p.add_argument("--scale", type=int, default=0, help="also time matching this many tiles of one city")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
