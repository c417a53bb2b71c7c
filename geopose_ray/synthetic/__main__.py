"""CLI: `python -m geopose_ray.synthetic OUT_DIR [--size N] [--per-city K] [--test-per-city T] [--seed S]
[--zoom Z] [--views V] [--gsd-jitter J] [--crop-jitter C] [--style NAME]`, or `OUT_DIR --family NAME`."""

from __future__ import annotations

import argparse
import time

from geopose_ray.errors import run_cli
from geopose_ray.synthetic.build import (
    DEFAULT_PER_CITY,
    DEFAULT_SIZE,
    DEFAULT_TEST_PER_CITY,
    MIN_SIZE,
    generate,
)
from geopose_ray.synthetic.family import FAMILY, generate_named
from geopose_ray.synthetic.planning import DEFAULT_CROP_JITTER, DEFAULT_VIEWS, MAX_GSD_JITTER
from geopose_ray.synthetic.styles import STYLE_SETS

SET_OPTIONS = (
    "size",
    "per_city",
    "test_per_city",
    "seed",
    "zoom",
    "views",
    "gsd_jitter",
    "crop_jitter",
    "style",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m geopose_ray.synthetic",
        description="Write the synthetic city (ARG, ATL, JAX, OMA) in the DrivenData layout.",
    )
    p.add_argument("out_dir", help="output folder (created; kept if it already holds this exact set)")
    p.add_argument(
        "--family", choices=list(FAMILY), help="write this named set (docs/DATASETS.md); no other set options"
    )
    p.add_argument("--size", type=int, help=f"tile size, px (default {DEFAULT_SIZE})")
    p.add_argument("--per-city", type=int, help=f"train tiles per city (default {DEFAULT_PER_CITY})")
    p.add_argument("--test-per-city", type=int, help=f"test tiles per city (default {DEFAULT_TEST_PER_CITY})")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument(
        "--zoom", type=float, help="building size and height multiplier (default: sqrt(size / 256))"
    )
    p.add_argument("--views", type=int, help=f"train tiles per place (default {DEFAULT_VIEWS})")
    p.add_argument("--gsd-jitter", type=float, help="relative GSD spread between a place's views (default 0)")
    p.add_argument(
        "--crop-jitter",
        type=float,
        help=f"crop offset between views, share of the tile (default {DEFAULT_CROP_JITTER})",
    )
    p.add_argument("--style", choices=list(STYLE_SETS), help="city look (default gentle)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in SET_OPTIONS if getattr(args, k) is not None}
    start = time.perf_counter()
    if args.family:
        if given:
            parser.error(f"--family {args.family} fixes every set option; drop --{', --'.join(given)}")
        out = generate_named(args.family, args.out_dir)
        spec = FAMILY[args.family]
        per_city, test_per_city, size = spec.per_city, spec.test_per_city, spec.size
    else:
        kw = {
            "size": DEFAULT_SIZE,
            "per_city": DEFAULT_PER_CITY,
            "test_per_city": DEFAULT_TEST_PER_CITY,
        } | given
        _check(parser, kw)
        out = generate(args.out_dir, **kw)
        per_city, test_per_city, size = kw["per_city"], kw["test_per_city"], kw["size"]
    print(
        f"{out}: {per_city} train + {test_per_city} test tiles per city, "
        f"{size} px ({time.perf_counter() - start:.1f} s)"
    )
    return 0


def _check(parser: argparse.ArgumentParser, kw: dict) -> None:
    """Exit 2 with a usage line on values generate() would refuse."""
    if kw["size"] < MIN_SIZE or kw["per_city"] < 1 or kw["test_per_city"] < 0 or kw.get("zoom", 1) <= 0:
        parser.error(f"need --size >= {MIN_SIZE}, --per-city >= 1, --test-per-city >= 0 and --zoom > 0")
    if kw.get("views", 1) < 1 or not 0 <= kw.get("gsd_jitter", 0) <= MAX_GSD_JITTER:
        parser.error(f"need --views >= 1 and 0 <= --gsd-jitter <= {MAX_GSD_JITTER}")
    if not 0 <= kw.get("crop_jitter", 0) <= 0.5:
        parser.error("need 0 <= --crop-jitter <= 0.5")


if __name__ == "__main__":
    run_cli(main)
