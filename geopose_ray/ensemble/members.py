"""Which checkpoints form the ensemble: the top configs of a search (`members.json`, all their
fold checkpoints) or explicit checkpoint folders, grouped into configs with one member per fold.

A config is what gets a blend weight; its fold members split the train tiles between them, so
config k's out-of-fold prediction of a tile in fold f comes from member (k, f). No `ray` import.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geopose_ray import experiment, storage
from geopose_ray.checkpoint import STATE_FILE, read_checkpoint_config
from geopose_ray.config import Config
from geopose_ray.errors import InputError
from geopose_ray.experiment import MEMBERS, Experiment, latest

REQUIRED_KEYS = ("rank", "config_id", "fold", "checkpoint", "config")


@dataclass(frozen=True)
class Member:
    config_id: str
    fold: int  # the validation fold this member did not train on
    checkpoint: Path | str  # folder holding state.pt: a Path, or a URI in a remote storage
    rank: int = 0  # the config's place in the search (0 = best)
    score: float = math.nan  # the trial's best validation score (single view, its own fold)
    oof_score: float = math.nan  # the config's score over all its folds' out-of-fold tiles
    selection_fold: int = -1  # the search's fold, whose tiles chose the config (-1: unknown)
    search_score: float = math.nan  # the config's best validation score there (single view)
    search_score_tta: float = math.nan  # its last epoch's score there with test-time views (D4)
    search_epochs: int = 0  # the epochs that trial ran (0: unknown); a refit may train more
    trial_id: str = ""
    config: dict[str, Any] = field(default_factory=dict, compare=False)  # flat Config keys

    def cfg(self) -> Config:
        return Config.from_dict(self.config, strict=False)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "checkpoint": str(self.checkpoint)}


def _number(value: Any) -> float:
    """A score from members.json: NaN when absent (null, or a file older than the key)."""
    return math.nan if value is None else float(value)


def _reject_constant(token: str) -> float:
    raise ValueError(f"{token} is not valid JSON")


def _load_json(path: str | Path) -> Any:
    """A JSON file from a path or a URI."""
    if not storage.is_file(path):
        raise InputError(path, "file not found")
    try:
        return json.loads(storage.read_bytes(path).decode(), parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(path, f"cannot parse JSON ({str(e).splitlines()[0][:120]})") from None


def _checkpoint_dir(value: Any, base: str | Path, source: str | Path) -> Path | str:
    """A member's checkpoint folder: absolute, a URI, or relative to the experiment folder `base`."""
    if not isinstance(value, str) or not value:
        raise InputError(source, f"checkpoint must be a folder path, got {value!r}")
    if storage.is_remote(value) or storage.is_remote(base):
        folder = value if storage.is_remote(value) else storage.join(base, value)
    else:
        folder = Path(value) if Path(value).is_absolute() else Path(base) / value
    if not storage.is_file(storage.join(folder, STATE_FILE)):
        name = Path(str(source)).name
        raise InputError(folder, f"no {STATE_FILE} in this checkpoint folder (listed in {name})")
    return folder


def _member(entry: Any, i: int, path: str | Path) -> Member:
    if not isinstance(entry, dict):
        raise InputError(path, f"entry {i} must be an object with keys {list(REQUIRED_KEYS)}")
    if missing := [k for k in REQUIRED_KEYS if k not in entry]:
        raise InputError(path, f"entry {i} lacks key(s) {missing}")
    try:
        rank, fold = int(entry["rank"]), int(entry["fold"])
        score = math.nan if entry.get("score") is None else float(entry["score"])
        oof = math.nan if entry.get("config_oof_score") is None else float(entry["config_oof_score"])
        chosen = {
            "selection_fold": int(entry.get("selection_fold", -1)),
            "search_score": _number(entry.get("search_score")),
            "search_score_tta": _number(entry.get("search_score_tta")),
            "search_epochs": int(entry.get("search_epochs") or 0),
        }
    except (TypeError, ValueError):
        raise InputError(path, f"entry {i}: rank and fold must be integers, the scores numbers") from None
    if not isinstance(entry["config"], dict):
        raise InputError(path, f"entry {i}: config must be a flat object of config keys")
    return Member(
        config_id=str(entry["config_id"]),
        fold=fold,
        checkpoint=_checkpoint_dir(entry["checkpoint"], storage.parent(path), path),
        rank=rank,
        score=score,
        oof_score=oof,
        **chosen,
        trial_id=str(entry.get("trial_id", "")),
        config=dict(entry["config"]),
    )


def read_members(root: str | Path, name: str, top_k: int) -> list[Member]:
    """The members of the `top_k` best configs in `<root>/<name>/members.json` (`root`: a folder
    or a URI; the file is read where it is, the checkpoints stay there too), with all their folds.

    Configs are chosen by their out-of-fold score, not by search rank: the rank comes from the
    search fold's tiles, which chose the configs, while the refit folds' out-of-fold tiles did
    not (`tune.search.refit_folds`). A config without that score comes after those with one,
    by rank."""
    path = Experiment(root, name).file(MEMBERS)
    doc = _load_json(path)
    if not isinstance(doc, list) or not doc:
        raise InputError(path, "expected a non-empty JSON list of members")
    members = [_member(e, i, path) for i, e in enumerate(doc)]
    keep = [cid for cid, _ in by_oof_score(members)][: max(1, top_k)]
    return [m for m in members if m.config_id in keep]


def by_oof_score(members: list[Member]) -> list[tuple[str, float]]:
    """(config_id, out-of-fold score) best first: a finite score first, then the search rank."""
    best: dict[str, tuple[float, int]] = {}
    for m in members:
        oof = -m.oof_score if math.isfinite(m.oof_score) else math.inf
        best[m.config_id] = min(best.get(m.config_id, (oof, m.rank)), (oof, m.rank))
    order = sorted(best, key=lambda c: (*best[c], c))
    return [(c, -best[c][0]) for c in order]


def oof_folds(members: dict[int, Member]) -> list[int]:
    """The folds of a config whose members predict out of fold: all but the search's own fold,
    whose tiles chose the config (a member there comes free from the search and predicts the
    test tiles only)."""
    return sorted(f for f, m in members.items() if f != m.selection_fold)


def latest_experiment(root: str | Path) -> str:
    """Name of the most recently written experiment in `root` (a folder or a URI) that has a
    members.json."""
    name = latest(root)
    if name is None:
        raise InputError(root, f"no experiment with {MEMBERS} here: run run_search.py first")
    return name


def members_from_checkpoints(folders: list[str | Path]) -> list[Member]:
    """Explicit checkpoint folders as members; folders whose configs differ only in the fold
    form one config (their order of appearance gives the config's rank)."""
    members, ids = [], {}
    for folder in map(Path, folders):
        config = read_checkpoint_config(folder)
        config_id = ids.setdefault(experiment.config_id(config), f"config{len(ids)}")
        fold = int(Config.from_dict(config, strict=False).data.fold)
        members.append(Member(config_id, fold, folder, rank=int(config_id[6:]), config=config))
    seen = [(m.config_id, m.fold) for m in members]
    if len(set(seen)) != len(seen):
        dup = next(s for s in seen if seen.count(s) > 1)
        raise InputError(folders[seen.index(dup)], f"two checkpoints of {dup[0]} for the same fold {dup[1]}")
    return members


def trained_data_dir(members: list[Member]) -> Path | None:
    """The data folder the members were trained on, when they all name the same one."""
    dirs = {m.config.get("data_dir") or "" for m in members}
    return Path(dirs.pop()) if len(dirs) == 1 and "" not in dirs else None


def lead_config(members: list[Member]) -> Config:
    """The Config of the best-ranked member: its data settings (folds, cache) rule the job."""
    return min(members, key=lambda m: (m.rank, m.config_id, m.fold)).cfg()


def cache_dir_for(data_dir: str | Path, cfg: Config) -> Path | None:
    """The members' own conversion cache when they were trained on this same data folder,
    else None (the default cache beside the data)."""
    d = cfg.data
    same_data = bool(d.data_dir) and Path(d.data_dir).resolve() == Path(data_dir).resolve()
    return Path(d.cache_dir) if same_data and d.cache_dir else None


def group_by_config(members: list[Member]) -> list[tuple[str, dict[int, Member]]]:
    """[(config_id, {fold: member})] in rank order."""
    groups: dict[str, dict[int, Member]] = {}
    for m in sorted(members, key=lambda m: (m.rank, m.config_id, m.fold)):
        groups.setdefault(m.config_id, {})[m.fold] = m
    return list(groups.items())
