"""`python -m geopose_ray.convert DATA_DIR [--cache DIR] [--compress none|deflate] [--workers N]`:
validate a DrivenData-layout set and convert it into the tiled-GeoTIFF cache with a local process
pool (see `geopose_ray.convert.convert`); prints the cache folder. A bad file exits 2 with one
line. No Ray: on a cluster, `run_search.py` converts with Ray tasks before its trials start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from geopose_ray.convert import convert, process_map
from geopose_ray.errors import HelpFormatter, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geopose_ray.convert", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="DrivenData layout root (train/, test/, CSV files)")
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default DATA_DIR/.geopose_cache)"
    )
    parser.add_argument(
        "--compress", choices=("none", "deflate"), default="none", help="cache tif compression"
    )
    parser.add_argument("--workers", type=int, default=0, help="processes (0: one per core)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    out = convert(args.data_dir, args.cache, args.compress, process_map(args.workers or None))
    print(out)
    return 0


if __name__ == "__main__":
    run_cli(main)
