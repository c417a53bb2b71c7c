"""The experiment folder: its whole layout, and the identity of configs and members. No `ray`.

    <storage>/<name>/                 the search's Tune experiment (trial_<id>/ per trial)
        search_options.json           what exactly ran (resolved options, resources, fixed keys)
        optuna.db                     the Optuna study (SQLite; `--optuna-storage` may put it elsewhere)
        leaderboard.csv, best_config.yaml, param_importances.json, *.png    the report
        members.json                  the ensemble's members: the refit configs x folds
        ensemble/                     run_ensemble.py's default output
    <storage>/<name>-refit/           the refit Tuner (trials over config rank x fold)
    <storage>/<name>-<trial id>/      each trial's Ray Train run (its checkpoints)

`<storage>` is a local folder or a URI (`s3://bucket/prefix`, `gs://...`, see `storage.py`).
Ray writes the trials and checkpoints there itself; the files this project writes (report,
members, SQLite, ensemble) are written into `Experiment.dir`, which for a remote storage is a
local mirror (`<cache>/<bucket>/<prefix>/<name>`), and uploaded with `push`.

The search, refit, report and ensemble code all name these paths through `Experiment`. Trials and
members are ranked by one metric, `METRIC` (the official score, `MODE` higher is better).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geopose_ray import paths, storage

METRIC, MODE = "score", "max"  # what ASHA, Optuna, checkpoints and members are ranked by
# where and which fold it ran, and when its statistics were re-measured for a validation (the
# weights trained are the same): not a config's identity
RUN_KEYS = ("data_dir", "cache_dir", "weights_cache", "fold", "precise_bn_every")
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
REPORT_FILES = (LEADERBOARD, BEST_CONFIG, IMPORTANCES, SCORE_VS_EPOCH, SCORE_BY_PARAM)


@dataclass(frozen=True)
class Experiment:
    """One experiment of `storage` (a local folder or a URI) by name. `cache`: the root of the
    local mirror of a remote storage (None: `paths.storage_cache()`)."""

    storage: str | Path
    name: str
    cache: Path | None = None

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.storage)

    @property
    def location(self) -> str:
        """Where Ray writes the experiment: a local path or a URI."""
        return storage.join(self.storage, self.name)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache) if self.cache else paths.storage_cache()

    @property
    def dir(self) -> Path:
        """The local folder this project writes its files into: the experiment folder itself,
        or its mirror in the local cache when the storage is remote."""
        return storage.cache_path(self.location, self.cache_root)

    @property
    def refit(self) -> Experiment:
        """The experiment of this search's fold refits."""
        return Experiment(self.storage, self.name + REFIT_SUFFIX, self.cache)

    def train_run(self, trial_id: str) -> str:
        """The Ray Train run location of one trial (see `train_run_name`)."""
        return storage.join(self.storage, train_run_name(self.name, trial_id))

    def file(self, name: str) -> str:
        """Location of a file of the experiment folder in the storage (not the local mirror)."""
        return storage.join(self.location, name)

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
        """The default Optuna storage: an SQLite file in the (local) experiment folder; with a
        remote storage, in its local mirror (SQLite cannot live on an object store)."""
        return f"sqlite:///{self.dir / OPTUNA_DB}"

    def push(self, *names: str) -> None:
        """Upload these files or folders of `dir` (relative names) to the remote experiment
        folder; missing ones are skipped. Nothing to do when the storage is local."""
        if not self.remote:
            return
        for name in names:
            if (self.dir / name).exists():
                storage.upload(self.dir / name, self.file(name))

    def fetch(self, name: str) -> Path | None:
        """The local copy of one file of the experiment folder, downloaded from the remote
        storage when it is missing locally; None when it exists in neither place."""
        local = self.dir / name
        if self.remote and not local.exists() and storage.exists(self.file(name)):
            storage.download(self.file(name), local)
        return local if local.exists() else None


def train_run_name(experiment: str, trial_id: str) -> str:
    """Train run folder of a trial: stable across restarts (no timestamp), unique across experiments."""
    return f"{experiment}-{trial_id}"


def trial_dirname(trial_id: str) -> str:
    """Tune trial folder `trial_<id>`: Tune's default embeds every sampled value (and the data path)."""
    return f"trial_{trial_id}"


def latest(location: str | Path) -> str | None:
    """Name of the most recently written experiment in `location` (a local folder or a URI)
    that has members, or None."""
    found = sorted(storage.subdir_files(location, MEMBERS), key=lambda item: item[1])
    return found[-1][0] if found else None


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
