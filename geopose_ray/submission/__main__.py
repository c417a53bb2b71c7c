"""`python -m geopose_ray.submission check ARCHIVE --data DIR` (exit 0 valid, 1 problems, 2 bad
input) and `python -m geopose_ray.submission pack PRED_DIR [--out ARCHIVE]`: the commands over
`geopose_ray.submission` (what a valid submission is: its module docstring).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geopose_ray.constants import SUBMISSION_ARCHIVE
from geopose_ray.errors import HelpFormatter, InputError, run_cli
from geopose_ray.submission import inspect_submission, pack


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m geopose_ray.submission", description=__doc__, formatter_class=HelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate a submission archive against the test list")
    check.add_argument("archive", help=f"{SUBMISSION_ARCHIVE} (or a folder of predictions)")
    check.add_argument("--data", required=True, help="DrivenData layout root (geopose_test.csv, test/)")
    check.add_argument("--workers", type=int, default=4)
    pk = sub.add_parser("pack", help="pack a folder of predictions into the submission archive")
    pk.add_argument("pred_dir")
    pk.add_argument("--out", default=None, help=f"archive path (default PRED_DIR/{SUBMISSION_ARCHIVE})")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "pack":
        print(pack(args.pred_dir, args.out))
        return 0
    if not Path(args.archive).exists():
        raise InputError(args.archive, "submission not found")
    report = inspect_submission(args.archive, args.data, workers=args.workers)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in report.problems:
        print(p)
    if report.problems:
        print(f"invalid: {len(report.problems)} problem(s) in {report.n_tiles} tiles")
        return 1
    print(f"valid: {report.n_tiles} tiles")
    return 0


if __name__ == "__main__":
    run_cli(main)
