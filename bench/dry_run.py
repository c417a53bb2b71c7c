"""A dry run's wall time: `run_search.py --dry-run` and `run_ensemble.py --dry-run` as a user runs
them (a fresh process each: Python start, imports, the checks, the plan), against the 10 s bound
of "A user's first day". The ratio is the slower command's median over the bound (<= 1 meets it).

    python bench/dry_run.py [--quick] [--work DIR]

The search plans the embedded default (smoke.yaml on the synthetic set, generated first if
missing: not timed); the ensemble plans fake members (an empty state.pt: a plan never loads
weights) on the same set. Neither starts Ray, downloads or writes in the experiment folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from geopose_ray import paths
from geopose_ray.errors import run_cli

BOUND_S = 10.0


def fake_experiment(storage: Path, name: str = "dry") -> Path:
    """An experiment with one config's members on folds 0 and 1 (configs as a smoke refit's)."""
    import yaml

    entries = []
    for fold in (0, 1):
        ckpt = storage / name / f"ckpt{fold}"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "state.pt").write_bytes(b"")
        config = {"fold": fold, "n_folds": 5, "encoder": "tu-resnet10t", "data_dir": str(paths.default_data_dir())}
        (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
        entries.append({"rank": 0, "config_id": "A", "fold": fold, "checkpoint": str(ckpt), "config": config})
    (storage / name / "members.json").write_text(json.dumps(entries))
    return storage


def timed_run(argv: list[str]) -> float:
    """Seconds of one command, which must succeed."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=common.REPO, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()[-300:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    work = common.work_dir(args.work) / "dry_run"
    from geopose_ray.synthetic import ensure_default

    ensure_default(paths.default_data_dir())  # the first run writes it: not part of the dry run
    storage = fake_experiment(work / "storage")
    repeats = 2 if args.quick else 5
    search = [timed_run(["run_search.py", "--dry-run", "--storage", str(work / "search")]) for _ in range(repeats)]
    ensemble = [timed_run(["run_ensemble.py", "--dry-run", "--storage", str(storage), "--name", "dry"])
                for _ in range(repeats)]  # fmt: skip
    worst = max(common.median(search), common.median(ensemble))
    common.emit(
        "dry_run",
        worst / BOUND_S,
        search_s=common.median(search),
        ensemble_s=common.median(ensemble),
        search_runs=search,
        ensemble_runs=ensemble,
        bound_s=BOUND_S,
        goal_met=common.goal_met(worst, "<=", BOUND_S),
        machine=common.machine(),
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
