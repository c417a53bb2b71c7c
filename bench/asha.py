"""Bench 3, ASHA: the smoke space searched twice with the same seed and samples, once with ASHA
and once without early stopping: total epochs trained, best score found, wall time.
Run it under `flock /tmp/geopose_ray.lock` (it starts Ray).

    flock /tmp/geopose_ray.lock python bench/asha.py [--quick] [--num-samples N] [--max-epochs E]

"No early stopping" is the same space with `grace_period = max_epochs`: ASHA then has a single
rung, at the full budget, so it never stops a trial (no option is needed in SearchOptions).
Both runs use Optuna's seeded RandomSampler (`--sampler random`; before the sampler setting, the
first 10 trials of a seeded TPE, also random), so they train the same configs (checked:
`same_configs`). `ratio` = epochs with ASHA / epochs without.
Goal: <= 0.35 with the same best trial, or a best score within 0.01.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from bench import common
from geopose_ray.errors import run_cli

GOAL_RATIO, GOAL_SCORE = 0.35, 0.01
FULL_SAMPLES = 10  # trials without --quick (the space's own count with it): all sampled at random
# (the seeded RandomSampler), so both runs train the same configs; 8 trials put the floor at 0.344 (asha_floor)


def asha_floor(trials: int, max_epochs: int, grace: int) -> float:
    """Fewest epochs ASHA can spend, as a fraction of the full budget, when trials run one at a
    time: the first trial always passes every rung, each later one stops at the first rung."""
    return (max_epochs + (trials - 1) * grace) / (trials * max_epochs)


def compare(asha: pd.DataFrame, full: pd.DataFrame) -> dict[str, Any]:
    """Epochs, best score and best config of two leaderboards (best first, as report writes them)."""
    best_a, best_f = float(asha["score"].iloc[0]), float(full["score"].iloc[0])
    return {
        "epochs_asha": int(asha["epochs_run"].sum()),
        "epochs_full": int(full["epochs_run"].sum()),
        "best_asha": best_a,
        "best_full": best_f,
        "best_delta": best_a - best_f,
        "same_best_trial": asha["config_id"].iloc[0] == full["config_id"].iloc[0],
        "same_configs": sorted(asha["config_id"]) == sorted(full["config_id"]),
        "stopped_early": int(asha["stopped_early"].sum()),
    }


def verdict(cmp: dict[str, Any]) -> bool | None:
    """The issue's goal: <= 35 % of the epochs and the same best (trial, or score within 0.01)."""
    ratio = cmp["epochs_asha"] / max(1, cmp["epochs_full"])
    if not math.isfinite(cmp["best_delta"]):
        return None
    same = cmp["same_best_trial"] or abs(cmp["best_delta"]) <= GOAL_SCORE
    return bool(ratio <= GOAL_RATIO and same)


def search(
    space: Path, data: Path, storage: Path, name: str, samples: int, max_epochs: int
) -> tuple[Any, float]:
    """One run_search on the connected Ray; (SearchResult, wall seconds)."""
    from geopose_ray.tune.search import SearchOptions, run_search

    opts = SearchOptions(
        space=str(space),
        data=str(data),
        storage=str(storage),
        name=name,
        num_samples=samples,
        max_epochs=max_epochs,
        seed=0,
        sampler="random",  # seeded random search: both runs propose the same configs
    )
    t0 = time.perf_counter()
    result = run_search(opts)
    return result, time.perf_counter() - t0


def save_curves(result: Any, path: Path) -> None:
    """The no-stop run's per-epoch scores and times, for `bench/asha_replay.py` (what another grace
    period or reduction factor would have spent, without training again)."""
    from bench.asha_replay import curves_from_records
    from geopose_ray.tune.report import load_trials

    curves = curves_from_records(load_trials(result.experiment_dir), "bench/asha.py no-stop run")
    path.write_text(json.dumps(curves, indent=1, default=str))


def run(args: Any) -> list[dict[str, Any]]:
    from geopose_ray.synthetic import generate
    from geopose_ray.tune.space import load_space

    work = common.work_dir(args.work)
    data = generate(work / "synthetic_default")  # the embedded default set (generator defaults)
    smoke = load_space(common.SMOKE_SPACE)
    samples = args.num_samples or (smoke.num_samples if args.quick else FULL_SAMPLES)
    max_epochs = args.max_epochs or smoke.scheduler.max_epochs
    rf = args.reduction_factor or smoke.scheduler.reduction_factor
    asha_space = common.SMOKE_SPACE
    if args.reduction_factor:  # the smoke space with another ASHA reduction factor
        asha_space = common.derived_space(work / "asha" / "asha.yaml", scheduler={"reduction_factor": rf})
    no_stop = common.derived_space(
        work / "asha" / "no_stop.yaml", scheduler={"max_epochs": max_epochs, "grace_period": max_epochs}
    )
    storage = work / "asha" / "storage"
    shutil.rmtree(storage, ignore_errors=True)
    try:
        with common.local_ray():
            with_asha, wall_a = search(asha_space, data, storage, "asha", samples, max_epochs)
            without, wall_f = search(no_stop, data, storage, "no_stop", samples, max_epochs)
        save_curves(without, work / "asha" / "curves_no_stop.json")
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    for name, result in (("asha", with_asha), ("no_stop", without)):  # every trial, for BENCHMARKS.md
        result.leaderboard.to_csv(work / "asha" / f"leaderboard_{name}.csv", index=False)
    cmp = compare(with_asha.leaderboard, without.leaderboard)
    ratio = cmp["epochs_asha"] / max(1, cmp["epochs_full"])
    grace = min(smoke.scheduler.grace_period, max_epochs)
    return [
        common.emit(
            "asha",
            ratio,
            **cmp,
            wall_asha_s=wall_a,
            wall_full_s=wall_f,
            wall_ratio=wall_a / wall_f,
            trials=samples,
            max_epochs=max_epochs,
            grace=grace,
            reduction_factor=rf,
            min_possible_ratio=asha_floor(samples, max_epochs, grace),
            goal="<= 0.35 epochs, same best (or within 0.01)",
            goal_met=verdict(cmp),
        )
    ]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--num-samples", type=int, help=f"trials (default: the space's with --quick, else {FULL_SAMPLES})"
    )
    p.add_argument("--max-epochs", type=int, help="budget per trial (default: the space's)")
    p.add_argument("--reduction-factor", type=float, help="ASHA's (default: the smoke space's, 2)")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
