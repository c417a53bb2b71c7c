"""Blend the best checkpoints of a search into a validated submission (Ray Data inference).

    python run_ensemble.py                               # latest experiment, synthetic data
    python run_ensemble.py --data DIR --name NAME --top-k 3 --tta d4 --address auto
    python run_ensemble.py --data DIR --checkpoints CKPT_DIR ...   # explicit members
    python run_ensemble.py --data DIR --storage s3://BUCKET/PREFIX  # an experiment in a bucket

Prints the blend table: the out-of-fold score of every member config, of the plain mean and of
the fitted blend and, when the data has a truth/ folder (the synthetic set), their official test
scores and `best member test X  blend test Y  (gain +Z)`; then the archive path (only once
`check_submission` accepted it; exit 1 otherwise) and the submission's official score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from geopose_ray.errors import HelpFormatter, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="DrivenData layout (default: the members' own, else the synthetic set)",
    )
    ap.add_argument("--storage", default=None, help="experiments: a folder or a URI, s3://BUCKET/PREFIX or "
                    "gs://... (default: runs/experiments)")  # fmt: skip
    ap.add_argument("--local-cache", type=Path, default=None, help="local mirror of a remote --storage: the "
                    "members' checkpoints and the ensemble's output before upload (default: runs/cache)")  # fmt: skip
    ap.add_argument("--name", default=None, help="experiment (default: the latest one with members.json)")
    ap.add_argument("--top-k", type=int, default=4, help="member configs to blend, each with all its folds")
    ap.add_argument("--tta", choices=("none", "flip", "d4"), default="d4", help="test-time views: "
                    "the 8 D4 views as the winners used (default), a horizontal flip, or none")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="output folder, or the archive's path when it ends "
                    "in .tar.gz (its work folder then sits beside it); default: <storage>/<name>/ensemble, "
                    "uploaded there when the storage is remote (all but predictions/)")  # fmt: skip
    ap.add_argument("--address", default=None, help="Ray cluster to join (default: a new local instance)")
    ap.add_argument("--checkpoints", nargs="+", type=Path, default=None, help="explicit member folders")
    ap.add_argument("--max-tile", type=int, default=None, help="predict larger tiles in overlapping windows")
    ap.add_argument("--actors", type=int, default=None, help="inference actors (default: one per GPU)")
    ap.add_argument("--verbose", action="store_true", help="Ray's full console: every worker's output")
    args = ap.parse_args(argv)
    if args.top_k < 1:
        ap.error("--top-k must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from geopose_ray.ensemble.launch import ensemble_from_args

    report = ensemble_from_args(args)  # bad input: InputError, exit 2 (run_cli)
    return 0 if report["valid"] else 1


if __name__ == "__main__":
    run_cli(main)
