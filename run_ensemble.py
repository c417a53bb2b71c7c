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

from geopose_ray import paths, storage
from geopose_ray.errors import HelpFormatter, InputError, run_cli
from geopose_ray.experiment import ENSEMBLE, Experiment


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


def output_paths(out: Path) -> tuple[Path, Path | None]:
    """(work folder, archive path or None for the default inside it). `--out NAME.tar.gz` names
    the archive itself: it goes exactly there, and its work folder `NAME_work` beside it."""
    if out.name.endswith(".tar.gz"):
        return out.with_name(out.name[: -len(".tar.gz")] + "_work"), out
    return out, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from geopose_ray.data.cache import validate_unless_cached
    from geopose_ray.ensemble import members as ms

    root = storage.normalize(args.storage) if args.storage else paths.default_storage()
    if args.checkpoints:
        members, name = ms.members_from_checkpoints(args.checkpoints), args.name or "checkpoints"
    else:
        name = args.name or ms.latest_experiment(root)
        members = ms.read_members(root, name, args.top_k)
    data = (args.data or ms.trained_data_dir(members) or paths.default_data_dir()).resolve()
    if not data.is_dir():
        raise InputError(data, "data folder not found (run run_search.py first, or pass --data)")
    # a bad data set fails here, in seconds, before Ray starts (the same check convert makes)
    validate_unless_cached(data, ms.cache_dir_for(data, ms.lead_config(members)))
    exp = Experiment(root, name, args.local_cache.resolve() if args.local_cache else None)
    out, archive = output_paths(args.out or exp.ensemble)
    from geopose_ray import ray_env
    from geopose_ray.ensemble.job import REPORT_JSON, blend_table, run_ensemble

    ray_env.init(args.address, verbose=args.verbose)

    report = run_ensemble(
        members,
        data,
        out,
        tta=args.tta,
        max_tile=args.max_tile,
        num_actors=args.actors,
        archive=archive,
        checkpoint_cache=exp.cache_root,
    )
    print(*blend_table(report), sep="\n")
    print(f"report: {out / REPORT_JSON}")
    if exp.remote and args.out is None:  # the tiles are in the archive: predictions/ stays local
        exp.push(*(f"{ENSEMBLE}/{p.name}" for p in sorted(out.iterdir()) if p.name != "predictions"))
        print(f"uploaded to {exp.file(ENSEMBLE)}")
    if not report["valid"]:
        print("submission INVALID:", *report["problems"], sep="\n  ")
        return 1
    print(f"submission: {report['archive']}")
    if report["test_score"] is not None:
        print(f"official score on the synthetic test truth: {report['test_score']['final']:.4f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
