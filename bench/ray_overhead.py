"""Bench 2, Ray overhead: one config, the same epochs, through `run_search` (one trial, one Train
worker) vs the Ray-free core `train_loop.fit` in a bare loop, on a run where the bare loop takes
>= 60 s. Run it under `flock /tmp/geopose_ray.lock` (it starts Ray).

    flock /tmp/geopose_ray.lock python bench/ray_overhead.py [--quick] [--target-s 60]

The config is the smoke space's default trial with full 256 px tiles (so an epoch is seconds,
not milliseconds) and a constant LR. The bare loop runs epochs until `--target-s` has passed
(the epoch count the Ray run then gets); it saves a checkpoint every epoch as the Ray worker
does, so the comparison is Ray's cost, not checkpointing's. A wrapper around the real per-worker
function timestamps when training starts and ends inside Ray, which separates:

- `ratio`: Ray's in-loop time (worker start to end: the same `fit`, plus Ray Train's reports,
  checkpoint registration and loader wrapping) / the bare loop. Goal <= 1.05.
- `startup_s`: ray.init to the first line of the worker function (Ray's fixed start-up cost),
  `ray_init_s` of it; `teardown_s`: worker end to ray.shutdown done (report files included).
- `ratio_total`: everything / the bare loop.
- `to_first_forward_s`: ray.init to the first training loss (`worker_to_first_forward_s` of it
  inside the worker function: data, model, DDP wrap); `first_step_s` / `second_step_s`: the first
  two optimizer steps (StepStamps). Tune's start to the first optimizer step is
  `to_first_forward_s + first_step_s`. `median_step_s` against `bare_median_step_s`: whether a
  step itself is slower inside Ray, or the time goes between the epochs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from geopose_ray.config import Config
from geopose_ray.errors import run_cli

GOAL = ("<=", 1.05)
MAX_EPOCHS = 200  # bare-loop cap when an epoch is very fast (then bare_s may stay < target)
FIXED = {"crop": 256, "val_crop": 0, "val_batch_size": 2, "threads": 2}


class EnoughEpochs(Exception):
    """Raised by the bare loop's reporter once the target time has passed (ends `fit` cleanly)."""


class StepStamps:
    """A `loss_hook` that notes when each training loss was computed: the first forward pass
    ends at stamps[0], stamps[1] - stamps[0] is the first optimizer step (backward, step, the next
    batch and forward), and the median gap between later stamps the steady step (`step_times`)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, step: int, loss: Any) -> Any:
        self.stamps.append(time.time())
        return loss


def step_times(stamps: list[float]) -> dict[str, float]:
    """First step, second step and the median step (gaps within an epoch are what a step costs;
    the gaps across an epoch end, which hold validation and the checkpoint, are above it)."""
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    if len(gaps) < 2:
        return {"first_step_s": math.nan, "second_step_s": math.nan, "median_step_s": math.nan}
    return {"first_step_s": gaps[0], "second_step_s": gaps[1], "median_step_s": common.median(gaps[1:])}


class TimedWorker:
    """The real per-worker function, timestamped: writes {"start", "end", "steps"} (epoch
    seconds; `steps`: StepStamps) to `<folder>/rank<r>.json`. Picklable (Ray workers import
    `bench` through PYTHONPATH)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, config: dict[str, Any]) -> None:
        import ray.train

        from geopose_ray.tune.trainer import train_fn_per_worker

        start, steps = time.time(), StepStamps()
        train_fn_per_worker(config, loss_hook=steps)
        rank = ray.train.get_context().get_world_rank()
        doc = {"start": start, "end": time.time(), "steps": steps.stamps}
        (Path(self.folder) / f"rank{rank}.json").write_text(json.dumps(doc))


def bare_loop(
    cfg: Config,
    target_s: float,
    ckpt_dir: Path,
    max_epochs: int = MAX_EPOCHS,
    stamps: StepStamps | None = None,
) -> tuple[float, int, float]:
    """(wall seconds, epochs, best validation score) of `fit` run epoch by epoch until `target_s` has passed
    (or `max_epochs` are done), with a checkpoint saved every epoch. The constant LR makes the
    first k epochs of any epoch budget the same training, so the epoch count can be decided
    while it runs."""
    from geopose_ray.checkpoint import save_state
    from geopose_ray.train_loop import fit

    done, score = 0, -math.inf
    t0 = time.perf_counter()

    def reporter(metrics: dict[str, float], state_fn: Any) -> None:
        nonlocal done, score
        done, score = int(metrics["epoch"]), max(score, float(metrics["score"]))
        if state_fn is not None:
            save_state(ckpt_dir, state_fn())
        if time.perf_counter() - t0 >= target_s:
            raise EnoughEpochs

    with contextlib.suppress(EnoughEpochs):
        fit(cfg.replace(epochs=max_epochs), reporter=reporter, loss_hook=stamps)
    return time.perf_counter() - t0, done, score


def ray_run(space: Path, data: Path, storage: Path, epochs: int) -> dict[str, float]:
    """One trial with one Train worker through run_search; the timeline in seconds."""
    from geopose_ray.tune.search import SearchOptions, run_search

    stamps = Path(tempfile.mkdtemp(prefix="stamps-", dir=storage))
    opts = SearchOptions(
        space=str(space),
        data=str(data),
        storage=str(storage),
        name="overhead",
        num_samples=1,
        workers_per_trial=1,
        cpus_per_worker=1.0,
        gpus_per_worker=0.0,
        max_epochs=epochs,
        seed=0,
    )
    t_start = time.time()
    with common.local_ray() as init_s:
        result = run_search(opts, train_fn=TimedWorker(str(stamps)))
    t_end = time.time()
    worker = json.loads((stamps / "rank0.json").read_text())
    steps = worker["steps"]
    return {
        "ray_init_s": init_s,
        "startup_s": worker["start"] - t_start,
        "to_first_forward_s": steps[0] - t_start,  # Tune's start (ray.init) to the first loss
        "worker_to_first_forward_s": steps[0] - worker["start"],  # data, model, DDP wrap
        **step_times(steps),
        "in_loop_s": worker["end"] - worker["start"],
        "teardown_s": t_end - worker["end"],
        "total_s": t_end - t_start,
        "ray_epochs": float(result.epochs_run),
        "ray_best_score": float(result.leaderboard["score"].iloc[0]),
    }


def overhead_space(work: Path, threads: int = FIXED["threads"]) -> Path:
    """The smoke space narrowed to this bench: one trial, full tiles, no early stop possible;
    `threads`: torch threads in both loops (the Train worker is given 1 CPU either way)."""
    return common.derived_space(
        work / "ray_overhead" / "space.yaml",
        num_samples=1,
        fixed={**FIXED, "threads": threads},
        scheduler={"max_epochs": MAX_EPOCHS, "grace_period": MAX_EPOCHS},
    )


def run(args: Any) -> list[dict[str, Any]]:
    from geopose_ray.train_loop import split_samples
    from geopose_ray.tune.space import load_space

    work = common.work_dir(args.work)
    data = common.synthetic_set(work, 256, per_city=8, test_per_city=2)
    space = load_space(overhead_space(work, args.threads))
    cfg = Config.from_dict({**space.defaults(), "data_dir": str(data)})
    split_samples(cfg)  # convert the cache before anything is timed
    storage = work / "ray_overhead" / "storage"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    try:
        bare_stamps = StepStamps()
        bare_s, epochs, bare_score = bare_loop(cfg, args.target_s, storage / "bare_ckpt", stamps=bare_stamps)
        ray = ray_run(space.path, data, storage, epochs)
        bare_runs = [bare_s]
        if not args.quick:  # A-B-A: load drift during the Ray run shows as a gap between the two
            bare_runs.append(bare_loop(cfg, math.inf, storage / "bare_ckpt", max_epochs=epochs)[0])
    finally:
        shutil.rmtree(storage, ignore_errors=True)  # checkpoints: hundreds of MB
    bare_s = sum(bare_runs) / len(bare_runs)
    ratio = ray["in_loop_s"] / bare_s
    return [
        common.emit(
            "ray_overhead",
            ratio,
            ratio_total=ray["total_s"] / bare_s,
            bare_s=bare_s,
            bare_runs_s=bare_runs,
            epochs=epochs,
            bare_best_score=bare_score,
            bare_median_step_s=step_times(bare_stamps.stamps)["median_step_s"],
            **ray,
            bare_ge_target=bare_runs[0] >= args.target_s,
            workers=1,
            threads=args.threads,
            tile_px=256,
            goal="<= 1.05 (startup reported apart)",
            goal_met=common.goal_met(ratio, *GOAL),
        )
    ]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--target-s", type=float, default=60.0, help="the bare loop runs at least this long")
    p.add_argument("--threads", type=int, default=FIXED["threads"], help="torch threads in both loops")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
