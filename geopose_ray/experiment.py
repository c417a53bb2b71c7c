"""The experiment folder: its whole layout, and the identity of configs and members. No `ray`.

    <storage>/<name>/                 the search's Tune experiment (trial_<id>/ per trial)
        search_options.json           what exactly ran (resolved options, resources, fixed keys)
        optuna.db                     the Optuna study (SQLite; `--optuna-storage` may put it elsewhere)
        leaderboard.csv, best_config.yaml, param_importances.json, *.png    the report
        members.json                  the ensemble's members: the refit configs x folds
        ensemble/                     run_ensemble.py's default output
    <storage>/<name>-refit/           the refit Tuner (trials over config rank x fold)
    <storage>/<name>-<trial id>/      each trial's Ray Train run (its checkpoints)

The search, refit, report and ensemble code all name these paths through `Experiment`. Trials and
members are ranked by one metric, `METRIC` (the official score, `MODE` higher is better).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRIC, MODE = "score", "max"  # what ASHA, Optuna, checkpoints and members are ranked by
RUN_KEYS = ("data_dir", "cache_dir", "weights_cache", "fold")  # where and which fold it ran: not identity
REFIT_SUFFIX = "-refit"
REFIT_CONFIGS = "refit_configs"  # refit trials: {"refit_configs": [...], "member": {"config_rank", "fold"}}

OPTIONS = "search_options.json"
MEMBERS = "members.json"
LEADERBOARD = "leaderboard.csv"
BEST_CONFIG = "best_config.yaml"
IMPORTANCES = "param_importances.json"
SCORE_VS_EPOCH = "score_vs_epoch.png"
SCORE_BY_PARAM = "score_by_param.png"
ENSEMBLE = "ensemble"
OPTUNA_DB = "optuna.db"


@dataclass(frozen=True)
class Experiment:
    """One experiment of `storage` (a local folder) by name."""

    storage: Path
    name: str

    @property
    def dir(self) -> Path:
        return Path(self.storage) / self.name

    @property
    def refit(self) -> Experiment:
        """The experiment of this search's fold refits."""
        return Experiment(self.storage, self.name + REFIT_SUFFIX)

    def train_run(self, trial_id: str) -> Path:
        """The Ray Train run folder of one trial (see `train_run_name`)."""
        return Path(self.storage) / train_run_name(self.name, trial_id)

    @property
    def members(self) -> Path:
        return self.dir / MEMBERS

    @property
    def options(self) -> Path:
        return self.dir / OPTIONS

    @property
    def ensemble(self) -> Path:
        return self.dir / ENSEMBLE

    @property
    def optuna_url(self) -> str:
        """The default Optuna storage: an SQLite file in the experiment folder (one machine)."""
        return f"sqlite:///{self.dir / OPTUNA_DB}"


def train_run_name(experiment: str, trial_id: str) -> str:
    """Train run folder of a trial: stable across restarts (no timestamp), unique across experiments."""
    return f"{experiment}-{trial_id}"


def trial_dirname(trial_id: str) -> str:
    """Tune trial folder `trial_<id>`: Tune's default embeds every sampled value (and the data path)."""
    return f"trial_{trial_id}"


def latest(storage: str | Path) -> str | None:
    """Name of the most recently written experiment in `storage` that has members, or None."""
    storage = Path(storage)
    found = sorted(storage.glob(f"*/{MEMBERS}"), key=lambda p: p.stat().st_mtime) if storage.is_dir() else []
    return found[-1].parent.name if found else None


def trial_train_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat Config dict a trial trains: search trials carry it directly, refit trials pick
    their row of `refit_configs` and their fold (`member`). Keys outside Config are bookkeeping."""
    from geopose_ray.config import key_owners

    if REFIT_CONFIGS in config:
        member = config["member"]
        config = {**config[REFIT_CONFIGS][int(member["config_rank"])], "fold": int(member["fold"])}
    owners = key_owners()
    return {k: v for k, v in config.items() if k in owners}


def config_id(train_config: dict[str, Any]) -> str:
    """Short stable hash of a config without its run keys: the same config on two folds shares it."""
    ident = {k: v for k, v in sorted(train_config.items()) if k not in RUN_KEYS}
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
