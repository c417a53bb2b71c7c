"""Hyperparameter search: Ray Tune + Optuna + ASHA over Ray Train runs, then fold refits.

    python run_search.py            # embedded default: synthetic set, smoke.yaml, CPU
    python run_search.py --dry-run  # the plan and a rough wall time, in seconds, no Ray
    python run_search.py --help     # every flag, in groups, and the exit codes

The command lives in `geopose_ray/tune/launch.py` (also installed as `geopose-search`); this
file only runs it, so that a fresh clone needs no install step beyond `make setup`.
"""

from __future__ import annotations

from geopose_ray.errors import run_cli
from geopose_ray.tune.launch import main

__all__ = ["main", "run_cli"]  # tests load this file and call run_cli(main, argv)

if __name__ == "__main__":
    run_cli(main)
