"""`python -m geopose_ray.convert DATA_DIR [--cache DIR] [--compress none|deflate] [--address ADDR]`:
validate a DrivenData-layout set and convert it into the tiled-GeoTIFF cache (see
`geopose_ray.convert.convert`); prints the cache folder. A bad file exits 2 with one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from geopose_ray.convert import convert
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
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    args = parser.parse_args(argv)
    out = convert(args.data_dir, args.cache, args.compress, args.address)
    print(out)
    return 0


if __name__ == "__main__":
    run_cli(main)
