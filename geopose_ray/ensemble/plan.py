"""The plan of an ensemble, as `run_ensemble.py --dry-run` prints it: the members (read and
checked, their checkpoints present), the data and whether its cache is current, the test-time
views, the inference actors, where the output goes, and a rough wall time. It converts,
downloads, writes and predicts nothing, and starts no Ray unless --address names a cluster.

`actor_pool` is the job's own rule for its actors (`job.run_actors` calls it with the live
cluster's resources), so the plan shows the pool the job would build. No `ray` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from geopose_ray import paths
from geopose_ray.console import duration
from geopose_ray.data import cache, layout, stats
from geopose_ray.ensemble.members import Member, cache_dir_for, group_by_config, lead_config, oof_folds
from geopose_ray.errors import InputError
from geopose_ray.experiment import ENSEMBLE, Experiment
from geopose_ray.redact import mask_url

# seconds per million pixels of one view of one member: CPU from bench/inference.py (0.39-0.59 s
# per 256 px tile of 8 D4 views, resnet18 Unet, docs/BENCHMARKS.md, 'Where the time goes (from
# the figures above)'); GPU assumed (not measured here)
CPU_S_PER_MPX = 1.1
GPU_S_PER_MPX = 0.02
JOB_START_S = 30.0  # Ray up, the actors started and every member loaded: assumed


def actor_pool(resources: dict[str, float], num_actors: int | None, n_items: int) -> tuple[int, dict[str, float], int]:
    """(actors, per-actor resources, torch threads): one actor per GPU, else CPU actors of 2 CPUs."""
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if gpus:
        return max(1, min(num_actors or gpus, n_items)), {"num_gpus": 1, "num_cpus": 1}, 0
    per = min(2, cpus)
    size = max(1, min(num_actors or max(1, cpus // per), n_items))
    return size, {"num_cpus": per}, per


def plan_ensemble(
    members: list[Member], data: Path, exp: Experiment, out: Path, archive: Path | None,
    args: Any, cluster: dict[str, float], where: str,
) -> list[str]:  # fmt: skip
    """The plan's lines (see the module doc); `args`: run_ensemble.py's flags (tta, actors,
    max_tile, out), `cluster`: the resources the job would see, `where`: how they were read."""
    from geopose_ray.tta import views_for

    configs = group_by_config(members)
    train, test = layout.load_split(data, "train"), layout.load_split(data, "test")
    if not test:
        raise InputError(data, "no test tiles to predict")
    cache_dir = cache_dir_for(data, lead_config(members)) or paths.default_cache_dir(data)
    current = cache.is_current(data, cache_dir)
    tile_px = (stats.from_cache(cache.load_cache(cache_dir, "train")) if current else stats.from_files(data)).tile_px
    views = len(views_for(args.tta))
    size, per_actor, _ = actor_pool(cluster, args.actors, len(test))
    upload = exp.remote and args.out is None
    return [
        f"members:    {len(members)} checkpoints of {len(configs)} config(s): "
        + "; ".join(f"{cid} folds {sorted(folds)}" + _test_only(folds) for cid, folds in configs),
        *([f"checkpoints: in {mask_url(str(exp.storage))}, downloaded into {exp.cache_root}"] if exp.remote else []),
        f"data:       {data}  ({len(train)} train / {len(test)} test tiles of ~{tile_px} px); cache "
        + ("current" if current else f"converted first into {cache_dir}"),
        f"tta:        {args.tta} ({views} view(s) per member)"
        + (f"; tiles over {args.max_tile} px in windows" if args.max_tile else ""),
        f"actors:     {size} x {per_actor}  ({where}: {dict(cluster)})",
        f"output:     {archive or out}" + (f"; uploaded to {mask_url(exp.file(ENSEMBLE))}" if upload else ""),
        _estimate_line(configs, lead_config(members).data.n_folds, len(train), len(test), tile_px, views, size,
                       per_actor),
    ]


def _test_only(folds: dict[int, Member]) -> str:
    """' (fold 0: the search's, test tiles only)' for a member on the fold that chose its config."""
    extra = sorted(set(folds) - set(oof_folds(folds)))
    return f" (fold {','.join(map(str, extra))}: the search's, test tiles only)" if extra else ""


def _estimate_line(
    configs: list[tuple[str, dict[int, Member]]], n_folds: int, n_train: int, n_test: int, tile_px: int,
    views: int, actors: int, per_actor: dict[str, float],
) -> str:  # fmt: skip
    """`estimate:` out-of-fold pass (the train tiles of the folds every config has a member for,
    once per config) and test pass (every member on every test tile), at the assumed rate, over
    the actors."""
    mpx = tile_px**2 / 1e6 * views
    covered = min(len(oof_folds(folds)) for _, folds in configs) / max(1, n_folds)
    oof = n_train * covered * len(configs) * mpx
    test = n_test * sum(len(folds) for _, folds in configs) * mpx
    gpu = "num_gpus" in per_actor
    rate = GPU_S_PER_MPX if gpu else CPU_S_PER_MPX
    seconds = (oof + test) * rate / max(1, actors) + JOB_START_S
    return (
        f"estimate:   ~{duration(seconds)} wall time, a rough estimate ({oof + test:.0f} million member-view pixels at an "
        f"assumed {rate} s per million per {'GPU' if gpu else 'CPU'} actor, plus {JOB_START_S:.0f} s to start)"
    )
