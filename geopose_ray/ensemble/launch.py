"""An ensemble as `run_ensemble.py` (and the `geopose-ensemble` command) runs it: its flags in
groups; the members and the data resolved and checked before Ray starts (a bad members.json or
data set fails in seconds, with one line); then the plan (--dry-run) or the job
(`job.run_ensemble`), the blend table, the upload to a remote experiment and the submission.

`ray` (through `ray_env` and `job`) is imported only once the checks have passed, and by a dry
run only when --address (or RAY_ADDRESS) names a cluster to read.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from geopose_ray import paths, storage
from geopose_ray.constants import TTA_NAMES
from geopose_ray.ensemble import members as ms
from geopose_ray.ensemble.report import REPORT_JSON, blend_table, calibration_lines, submission_lines
from geopose_ray.errors import EXIT_CODES, EXIT_FAILURE, EXIT_OK, HelpFormatter, InputError, run_cli
from geopose_ray.experiment import ENSEMBLE, Experiment
from geopose_ray.redact import mask_url

DESCRIPTION = """Blend the best checkpoints of a search into a validated submission (Ray Data inference).

    python run_ensemble.py                               # latest experiment, synthetic data
    python run_ensemble.py --dry-run                     # the plan and a rough wall time, no Ray
    python run_ensemble.py --data DIR --name NAME --top-k 3 --tta d4 --address auto
    python run_ensemble.py --data DIR --checkpoints CKPT_DIR ...   # explicit members
    python run_ensemble.py --data DIR --storage s3://BUCKET/PREFIX  # an experiment in a bucket

Prints the blend table: the out-of-fold score of every member config, of the plain mean and of
the fitted blend and, when the data has a truth/ folder (the synthetic set), their official test
scores and `best member test X  blend test Y  (gain +Z)`; then the archive path (only once
`check_submission` accepted it) and the submission's official score. `geopose-ensemble` is the
same command.
"""
EPILOG = textwrap.fill(
    f"{EXIT_CODES}. 1 also when check_submission refused the archive. Passwords and tokens in a "
    "--storage URI are masked (***) in every line it prints.",
    width=100,
    break_on_hyphens=False,
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--data", type=Path, help="DrivenData layout (default: the members' own, else the synthetic set)")
    g = ap.add_argument_group("members")
    g.add_argument("--name", help="experiment (default: the latest one with members.json)")
    g.add_argument("--top-k", type=int, default=4, help="member configs to blend, each with all its folds")
    g.add_argument("--checkpoints", nargs="+", type=Path, help="explicit member folders")
    g.add_argument("--tta", choices=TTA_NAMES, default="d4", help="test-time views: the 8 D4 "
                   "views as the winners used (default), 4 flips and rotations, or none")  # fmt: skip
    g.add_argument("--max-tile", type=int, help="predict larger tiles in overlapping windows")
    g.add_argument("--dry-run", action="store_true", help="check the members, data, resources and storage, "
                   "print the plan with a rough wall time, and stop: converts, downloads and writes "
                   "nothing, starts no Ray unless --address names a cluster")  # fmt: skip
    g = ap.add_argument_group("resources")
    g.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local instance)")
    g.add_argument("--actors", type=int, help="inference actors (default: one per GPU, else one per 2 CPUs)")
    g = ap.add_argument_group("storage")
    g.add_argument("--storage", help="experiments: a folder or a URI, s3://BUCKET/PREFIX or gs://... "
                   "(default: runs/experiments)")  # fmt: skip
    g.add_argument("--local-cache", type=Path, help="local mirror of a remote --storage: the members' "
                   "checkpoints and the ensemble's output before upload (default: runs/cache)")  # fmt: skip
    g.add_argument("--out", type=Path, help="output folder, or the archive's path when it ends in .tar.gz "
                   "(its work folder then sits beside it); default: <storage>/<name>/ensemble, uploaded "
                   "there when the storage is remote (all but predictions/)")  # fmt: skip
    g = ap.add_argument_group("console")
    g.add_argument("--verbose", action="store_true", help="Ray's full console: every worker's output")
    return ap


def output_paths(out: Path) -> tuple[Path, Path | None]:
    """(work folder, archive path or None for the default inside it). `--out NAME.tar.gz` names
    the archive itself: it goes exactly there, and its work folder `NAME_work` beside it."""
    if out.name.endswith(".tar.gz"):
        return out.with_name(out.name[: -len(".tar.gz")] + "_work"), out
    return out, None


def select_members(args: argparse.Namespace, root: str | Path) -> tuple[list[ms.Member], str]:
    """(members, experiment name): the --checkpoints folders, else the --top-k configs of the
    experiment --name (default: the latest one with members) in `root`."""
    if args.checkpoints:
        return ms.members_from_checkpoints(args.checkpoints), args.name or "checkpoints"
    name = args.name or ms.latest_experiment(root)
    return ms.read_members(root, name, args.top_k), name


def checked_data(data: Path | None, members: list[ms.Member]) -> Path:
    """--data, else the folder the members were trained on, else the embedded set; refused with
    InputError before Ray starts when missing or malformed (the same check convert makes)."""
    from geopose_ray.data.cache import validate_unless_cached

    data = (data or ms.trained_data_dir(members) or paths.default_data_dir()).resolve()
    if not data.is_dir():
        raise InputError(data, "data folder not found (run run_search.py first, or pass --data)")
    validate_unless_cached(data, ms.cache_dir_for(data, ms.lead_config(members)))
    return data


def ensemble_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """Everything `run_ensemble.py` does after parsing; returns the job's report (its `valid` is
    False when `check_submission` refused the archive), or None after a dry run's plan."""
    root = storage.normalize(args.storage) if args.storage else paths.default_storage()
    storage.probe(root)  # credentials and endpoint, in seconds (a no-op for a folder)
    members, name = select_members(args, root)
    data = checked_data(args.data, members)
    exp = Experiment(root, name, args.local_cache.resolve() if args.local_cache else None)
    out, archive = output_paths(args.out or exp.ensemble)
    if args.dry_run:
        print(*dry_run(members, data, exp, out, archive, args), sep="\n")
        return None
    from geopose_ray import ray_env
    from geopose_ray.ensemble.job import run_ensemble

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
    print(*blend_table(report), *calibration_lines(report), f"report: {out / REPORT_JSON}", sep="\n")
    if exp.remote and args.out is None:  # the tiles are in the archive: predictions/ stays local
        exp.push(*(f"{ENSEMBLE}/{p.name}" for p in sorted(out.iterdir()) if p.name != "predictions"))
        print(f"uploaded to {mask_url(exp.file(ENSEMBLE))}")
    print(*submission_lines(report), sep="\n")
    return report


def dry_run(
    members: list[ms.Member], data: Path, exp: Experiment, out: Path, archive: Path | None, args: argparse.Namespace
) -> list[str]:
    """The plan (`plan.plan_ensemble`): on this machine's CPUs and GPUs without Ray, or on the
    cluster --address names."""
    from geopose_ray.ensemble.plan import plan_ensemble
    from geopose_ray.tune.capacity import LOCAL, local_cluster, resolve_address

    if resolve_address(args.address) == LOCAL:
        cluster = local_cluster()[0]
        return plan_ensemble(members, data, exp, out, archive, args, cluster, "this machine, read without Ray")
    from geopose_ray import ray_env

    ray_env.init(args.address, verbose=args.verbose)
    try:
        return plan_ensemble(members, data, exp, out, archive, args, ray_env.cluster_resources()[0], "the cluster")
    finally:
        ray_env.shutdown()


def main(argv: list[str] | None = None) -> int:
    """`run_ensemble.py` / `geopose-ensemble`: 0 a valid submission (or a plan), 1 refused."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    report = ensemble_from_args(args)  # bad input: InputError, exit 2 (run_cli)
    return EXIT_OK if report is None or report["valid"] else EXIT_FAILURE


def cli() -> None:
    """The `geopose-ensemble` console script (pyproject.toml's [project.scripts])."""
    run_cli(main)
