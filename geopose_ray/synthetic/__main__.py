"""CLI: `python -m geopose_ray.synthetic OUT_DIR [--size N] [--per-city K] [--test-per-city T] [--seed S] [--zoom Z]`."""

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m geopose_ray.synthetic",
        description="Write the synthetic city (ARG, ATL, JAX, OMA) in the DrivenData layout.",
    )
    p.add_argument("out_dir", help="output folder (created; kept if it already holds this exact set)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="tile size, px (default %(default)s)")
    p.add_argument(
        "--per-city", type=int, default=DEFAULT_PER_CITY, help="train tiles per city (default %(default)s)"
    )
    p.add_argument(
        "--test-per-city",
        type=int,
        default=DEFAULT_TEST_PER_CITY,
        help="test tiles per city (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--zoom", type=float, help="building size and height multiplier (default: sqrt(size / 256))"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.size < MIN_SIZE or args.per_city < 1 or args.test_per_city < 0 or (args.zoom or 1) <= 0:
        parser.error(f"need --size >= {MIN_SIZE}, --per-city >= 1, --test-per-city >= 0 and --zoom > 0")
    start = time.perf_counter()
    out = generate(args.out_dir, args.size, args.per_city, args.test_per_city, args.seed, args.zoom)
    print(
        f"{out}: {args.per_city} train + {args.test_per_city} test tiles per city, "
        f"{args.size} px ({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
