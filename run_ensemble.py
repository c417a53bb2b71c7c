"""Blend the best checkpoints of a search into a validated submission (Ray Data inference).

    python run_ensemble.py                               # latest experiment, synthetic data
    python run_ensemble.py --data DIR --name NAME --top-k 3 --tta d4 --address auto
    python run_ensemble.py --data DIR --checkpoints CKPT_DIR ...   # explicit members

Prints the blend table: the out-of-fold score of every member config, of the plain mean and of
the fitted blend and, when the data has a truth/ folder (the synthetic set), their official test
scores and `best member test X  blend test Y  (gain +Z)`; then the archive path (only once
`check_submission` accepted it; exit 1 otherwise) and the submission's official score.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from geopose_ray import paths
from geopose_ray.errors import InputError, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="DrivenData layout (default: the members' own, else the synthetic set)",
    )
    ap.add_argument("--storage", type=Path, default=None, help="experiments (default: runs/experiments)")
    ap.add_argument("--name", default=None, help="experiment (default: the latest one with members.json)")
    ap.add_argument("--top-k", type=int, default=2, help="member configs to blend, each with all its folds")
    ap.add_argument("--tta", choices=("none", "flip", "d4"), default="d4", help="test-time views: "
                    "the 8 D4 views as the winners used (default), a horizontal flip, or none")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="default: <storage>/<name>/ensemble")
    ap.add_argument("--address", default=None, help="Ray cluster to join (default: a new local instance)")
    ap.add_argument("--checkpoints", nargs="+", type=Path, default=None, help="explicit member folders")
    ap.add_argument("--max-tile", type=int, default=None, help="predict larger tiles in overlapping windows")
    ap.add_argument("--actors", type=int, default=None, help="inference actors (default: one per GPU)")
    ap.add_argument("--verbose", action="store_true", help="Ray's full console: every worker's output")
    args = ap.parse_args(argv)
    if args.top_k < 1:
        ap.error("--top-k must be >= 1")
    return args


def _init_ray(address: str | None, verbose: bool) -> None:
    """Join `address`, or start a fresh local instance (never a stale one, RAY_NOTES section 0),
    with the console of `geopose_ray.console`."""
    import ray

    from geopose_ray import console

    if ray.is_initialized():
        return
    quiet = console.setup(verbose)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=True if address == "local" else None, **quiet)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from geopose_ray.data.cache import validate_unless_cached
    from geopose_ray.ensemble import members as ms

    storage = args.storage or paths.default_storage()
    if args.checkpoints:
        members, name = ms.members_from_checkpoints(args.checkpoints), args.name or "checkpoints"
    else:
        name = args.name or ms.latest_experiment(storage)
        members = ms.read_members(storage, name, args.top_k)
    data = (args.data or ms.trained_data_dir(members) or paths.default_data_dir()).resolve()
    if not data.is_dir():
        raise InputError(data, "data folder not found (run run_search.py first, or pass --data)")
    # a bad data set fails here, in seconds, before Ray starts (the same check convert makes)
    validate_unless_cached(data, ms.cache_dir_for(data, ms.lead_config(members)))
    out = args.out or storage / name / "ensemble"
    _init_ray(args.address, args.verbose)
    from geopose_ray.ensemble.job import REPORT_JSON, blend_table, run_ensemble

    report = run_ensemble(members, data, out, tta=args.tta, max_tile=args.max_tile, num_actors=args.actors)
    print(*blend_table(report), sep="\n")
    print(f"report: {out / REPORT_JSON}")
    if not report["valid"]:
        print("submission INVALID:", *report["problems"], sep="\n  ")
        return 1
    print(f"submission: {report['archive']}")
    if report["test_score"] is not None:
        print(f"official score on the synthetic test truth: {report['test_score']['final']:.4f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
