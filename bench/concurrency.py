"""Bench 6, concurrency: trials per hour with 1 vs 2 trials running at once on this machine, and
what limits it. Run it under `flock /tmp/geopose_ray.lock` (it starts Ray).

    flock /tmp/geopose_ray.lock python bench/concurrency.py [--quick] [--num-samples N] [--epochs E]

Both runs search the smoke space (same seed, so the same configs) without early stopping, one
Train worker per trial, and give each setting the whole machine: 1 trial x 2 torch threads, or
2 trials x 1 thread (cpus_per_worker = cores / concurrent - the driver's 0.01, so the search's
own concurrency cap comes out at exactly 1 or 2). `ratio` = trials/h at 2 / trials/h at 1.
Where the time goes: `train_share` = epochs' training seconds / trial seconds (the rest is
Ray Train start-up, the data split, the model build, validation and checkpoints), the CPU busy
fraction of the whole machine over each run (other users' load included: see `load_1m`), and
the peak memory in use.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from geopose_ray.errors import run_cli


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


class Usage:
    """Context manager: the machine's CPU busy fraction over the block and the peak memory in use
    (MemTotal - MemAvailable, GiB), sampled every `interval` seconds by a thread."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.busy_frac = float("nan")
        self.peak_mem_gib = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            used = (common.mem_kib("MemTotal") - common.mem_kib("MemAvailable")) / 2**20
            self.peak_mem_gib = max(self.peak_mem_gib, used)
            self._stop.wait(self.interval)

    def __enter__(self) -> Usage:
        self._start = cpu_ticks()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        busy, total = (b - a for a, b in zip(self._start, cpu_ticks()))
        self.busy_frac = busy / total if total else float("nan")


def train_share(records: list[Any]) -> float:
    """Training seconds (the epochs' `epoch_time_s`) / trial seconds (Tune's `time_total_s`),
    over all trials."""
    train = trial = 0.0
    for r in records:
        if "epoch_time_s" in r.history and "time_total_s" in r.history and len(r.history):
            train += float(r.history["epoch_time_s"].sum())
            trial += float(r.history["time_total_s"].max())
    return train / trial if trial > 0 else float("nan")


def limit(one: dict[str, float], two: dict[str, float]) -> str:
    """One line naming what bounds the throughput, from the two runs' figures."""
    gain = two["trials_per_h"] / one["trials_per_h"]
    if one["cpu_busy"] >= 0.85 and gain < 1.1:
        return "CPU: one trial already keeps both cores busy, a second only shares them"
    if gain >= 1.1:
        return (
            f"per-trial fixed costs (only {one['train_share']:.0%} of a trial trains): a second "
            "trial overlaps them with training; bounded by the 2 cores"
        )
    return "neither: load from other users dominates (see cpu_busy, load_1m)"


def one_setting(work: Path, data: Path, concurrent: int, samples: int, epochs: int) -> dict[str, float]:
    """Search with `concurrent` trials at once; throughput and where the time went."""
    from geopose_ray.tune.capacity import DRIVER_CPUS
    from geopose_ray.tune.report import load_trials
    from geopose_ray.tune.search import SearchOptions, run_search

    cores = os.cpu_count() or 2
    threads = max(1, cores // concurrent)
    space = common.derived_space(
        work / "concurrency" / f"c{concurrent}.yaml",
        num_samples=samples,
        fixed={"threads": threads},
        scheduler={"max_epochs": epochs, "grace_period": epochs},
        resources={"workers_per_trial": 1, "cpus_per_worker": cores / concurrent - DRIVER_CPUS},
    )
    storage = work / "concurrency" / "storage"
    opts = SearchOptions(
        space=str(space), data=str(data), storage=str(storage), name=f"c{concurrent}", seed=0
    )
    with Usage() as usage:
        t0 = time.perf_counter()
        result = run_search(opts)
        wall = time.perf_counter() - t0
    return {
        "trials": float(result.trials),
        "wall_s": wall,
        "trials_per_h": result.trials / wall * 3600.0,
        "train_share": train_share(load_trials(result.experiment_dir)),
        "cpu_busy": usage.busy_frac,
        "peak_mem_gib": usage.peak_mem_gib,
        "threads_per_trial": float(threads),
    }


def run(args: Any) -> list[dict[str, Any]]:
    work = common.work_dir(args.work)
    data = common.synthetic_set(work, 256, per_city=8, test_per_city=2)
    samples = args.num_samples or (4 if args.quick else 8)
    epochs = args.epochs or (2 if args.quick else 3)
    storage = work / "concurrency" / "storage"
    shutil.rmtree(storage, ignore_errors=True)
    load = os.getloadavg()[0]
    try:
        with common.local_ray(num_cpus=os.cpu_count()):
            one = one_setting(work, data, 1, samples, epochs)
            two = one_setting(work, data, 2, samples, epochs)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    ratio = two["trials_per_h"] / one["trials_per_h"]
    details = {f"{k}_{c}": v for c, res in (("c1", one), ("c2", two)) for k, v in res.items()}
    return [
        common.emit(
            "concurrency",
            ratio,
            **details,
            epochs=epochs,
            limit=limit(one, two),
            load_1m=load,
            goal="record + what limits it",
            goal_met=None,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, help="trials per setting (default 4 with --quick, else 8)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default 2 with --quick, else 3)")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
