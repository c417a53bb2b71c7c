"""Blend the best checkpoints of a search into a validated submission (Ray Data inference).

    python run_ensemble.py            # the latest experiment's members, synthetic data
    python run_ensemble.py --dry-run  # the plan and a rough wall time, no Ray
    python run_ensemble.py --help     # every flag, in groups, and the exit codes

The command lives in `geopose_ray/ensemble/launch.py` (also installed as `geopose-ensemble`);
this file only runs it, so that a fresh clone needs no install step beyond `make setup`.
"""

from __future__ import annotations

from geopose_ray.ensemble.launch import main
from geopose_ray.errors import run_cli

__all__ = ["main", "run_cli"]  # tests load this file and call run_cli(main, argv)

if __name__ == "__main__":
    run_cli(main)
