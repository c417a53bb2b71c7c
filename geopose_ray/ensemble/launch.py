"""An ensemble as `run_ensemble.py` runs it: the members and the data resolved and checked
before Ray starts (a bad members.json or data set fails in seconds, with one line), then the job
(`job.run_ensemble`), the blend table, the upload to a remote experiment and the submission.
The script only parses its flags and turns the report into an exit code.

`ray` (through `ray_env` and `job`) is imported only once the checks have passed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from geopose_ray import paths, storage
from geopose_ray.ensemble import members as ms
from geopose_ray.ensemble.report import REPORT_JSON, blend_table, calibration_lines, submission_lines
from geopose_ray.errors import InputError
from geopose_ray.experiment import ENSEMBLE, Experiment


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


def ensemble_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `run_ensemble.py` does after parsing; returns the job's report (its `valid` is
    False when `check_submission` refused the archive)."""
    root = storage.normalize(args.storage) if args.storage else paths.default_storage()
    members, name = select_members(args, root)
    data = checked_data(args.data, members)
    exp = Experiment(root, name, args.local_cache.resolve() if args.local_cache else None)
    out, archive = output_paths(args.out or exp.ensemble)
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
        print(f"uploaded to {exp.file(ENSEMBLE)}")
    print(*submission_lines(report), sep="\n")
    return report
