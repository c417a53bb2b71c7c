"""`python -m geopose_ray.score TRUTH_DIR PREDICTIONS` (a folder or a .tar.gz): one JSON line with
the official score (NaN, a city with no truth, is null); a city that scores 0 for a missing or bad
prediction is named on stderr; bad truth files exit 2. See `geopose_ray.score.score_dirs`.
"""

from __future__ import annotations

import argparse
import json
import sys

from geopose_ray.atomic import json_safe
from geopose_ray.errors import HelpFormatter, run_cli
from geopose_ray.score import OUTPUT_KEYS, score_dirs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m geopose_ray.score", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("truth_dir", help="folder of truth {CITY}_{id}_AGL.tif and _VFLOW.json files")
    ap.add_argument("predictions", help="folder or .tar.gz of predictions with the same file names")
    ap.add_argument("--workers", type=int, default=None, help="reader threads (default min(4, cpus))")
    args = ap.parse_args(argv)
    result = score_dirs(args.truth_dir, args.predictions, workers=args.workers)
    for city, problems in result["failures"].items():
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        print(f"warning: {city} scores 0: {problems[0]}{more}", file=sys.stderr)
    print(json.dumps(json_safe({k: result[k] for k in OUTPUT_KEYS}), allow_nan=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
