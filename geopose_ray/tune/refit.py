"""Fold refits: the K best configs of a search (run on one fold) trained on every requested fold
to the full epoch budget, with no early stopping; the runs become the ensemble's members.

A second Tuner (`<name>-refit`) runs a grid over (config_rank, fold) with the FIFO scheduler.
A search trial that already ran the full budget on one of those folds *is* that refit run (same
config, fold and epochs; ASHA only ever stops trials early), so it is reused, not retrained.
`<storage>/<name>/members.json` lists every member and its best checkpoint (by score).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geopose_ray.atomic import atomic_write_text
from geopose_ray.checkpoint import VAL_SCORE_FILE
from geopose_ray.errors import InputError
from geopose_ray.metrics import GeoposeScore
from geopose_ray.tune import report
from geopose_ray.tune.driver import (
    METRIC,
    MODE,
    REFIT_CONFIGS,
    DriverSettings,
    make_trainable,
    train_run_name,
    trial_dirname,
)
from geopose_ray.tune.space import SearchSpace

log = logging.getLogger(__name__)
MEMBERS = "members.json"


def parse_folds(spec: str) -> tuple[int, ...]:
    """`--folds`: a comma list ("0,1,3") or a count ("2" = folds 0 and 1)."""
    try:
        if "," in spec:
            folds = tuple(int(f) for f in spec.split(",") if f.strip())
        else:
            folds = tuple(range(int(spec)))
    except ValueError:
        raise InputError("--folds", f"expected a count or a comma list of folds, not {spec!r}") from None
    if not folds or min(folds) < 0 or len(set(folds)) != len(folds):
        raise InputError("--folds", f"need distinct folds >= 0, got {spec!r}")
    return folds


def top_configs(records: list[report.TrialRecord], k: int) -> list[report.TrialRecord]:
    """Best trial of each of the `k` best distinct configs (finished trials, finite score)."""
    best: dict[str, report.TrialRecord] = {}
    for r in records:
        score = r.best()[0]
        if r.status != "TERMINATED" or not math.isfinite(score):
            continue
        cid = report.config_id(r.train_config)
        if cid not in best or score > best[cid].best()[0]:
            best[cid] = r
    return sorted(best.values(), key=lambda r: r.best()[0], reverse=True)[:k]


def reusable(
    records: list[report.TrialRecord], cid: str, fold: int, max_epochs: int
) -> report.TrialRecord | None:
    """The best search trial of config `cid` that ran the whole budget on `fold`, if any."""
    done = [
        r
        for r in records
        if r.status == "TERMINATED"
        and r.epochs_run() >= max_epochs
        and report.config_id(r.train_config) == cid
        and int(r.train_config.get("fold", -1)) == fold
    ]
    return max(done, key=lambda r: r.best()[0], default=None)


def build_refit_tuner(
    configs: list[dict],
    jobs: list[tuple[int, int]],
    trainable: Any,
    settings: DriverSettings,
    conc: int,
    space: SearchSpace,
) -> Any:
    from ray import tune

    from geopose_ray.tune import progress

    return tune.Tuner(
        trainable,
        param_space={
            REFIT_CONFIGS: configs,
            "member": tune.grid_search([{"config_rank": r, "fold": f} for r, f in jobs]),
        },
        tune_config=tune.TuneConfig(  # FIFO scheduler: no early stopping
            num_samples=1, max_concurrent_trials=conc, trial_dirname_creator=trial_dirname
        ),
        run_config=tune.RunConfig(
            name=settings.experiment,
            storage_path=settings.storage_path,
            **progress.run_config_kwargs(
                space.searched(), space.scheduler.max_epochs, ["member/config_rank", "member/fold"]
            ),
        ),
    )


def best_checkpoint(storage: str, experiment: str, trial_id: str) -> tuple[str | None, float]:
    """(path, score) of a trial's best kept Train checkpoint, or (None, nan)."""
    import ray.train

    run_dir = Path(storage) / train_run_name(experiment, trial_id)
    if not run_dir.is_dir():
        return None, math.nan
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # loading a snapshot logs a long "resuming" notice
    try:
        result = ray.train.Result.from_path(str(run_dir))
    finally:
        quiet.setLevel(level)
    ckpt = result.get_best_checkpoint(METRIC, MODE)
    if ckpt is None:
        return None, math.nan
    score = next(
        (m.get(METRIC, math.nan) for c, m in result.best_checkpoints if c.path == ckpt.path), math.nan
    )
    return ckpt.path, float(score)


def member_row(rank: int, rec: report.TrialRecord, experiment: str, storage: str, source: str) -> dict | None:
    cfg = rec.train_config
    path, score = best_checkpoint(storage, experiment, rec.trial_id)
    if path is None:
        log.warning("trial %s of %s has no checkpoint: not a member", rec.trial_id, experiment)
        return None
    val_score = Path(path) / VAL_SCORE_FILE  # this fold's metric accumulators (out-of-fold)
    return {
        "rank": rank,
        "config_id": report.config_id(cfg),
        "fold": int(cfg["fold"]),
        "trial_id": rec.trial_id,
        "experiment": experiment,
        "source": source,  # "search" (reused full-budget trial) or "refit"
        "score": score if math.isfinite(score) else rec.best()[0],
        "checkpoint": path,
        "val_score": str(val_score) if val_score.is_file() else None,
        "config": {k: report.plain(v) for k, v in cfg.items()},
    }


def add_oof_scores(members: list[dict]) -> None:
    """Each member gets `config_oof_score`: the official score of its config over all its folds'
    validation tiles at once, from the summed accumulators (the metric is a sum of per-city
    statistics, so this equals scoring the pooled out-of-fold predictions; no re-run). NaN when
    a fold's accumulators are missing. The ensemble job still predicts out-of-fold itself, with
    its TTA, to fit blend weights: those need the predictions, not only their statistics."""
    by_config: dict[str, list[dict]] = {}
    for m in members:
        by_config.setdefault(m["config_id"], []).append(m)
    for rows in by_config.values():
        score = math.nan
        if all(r["val_score"] for r in rows):
            total = sum(GeoposeScore.from_array(np.load(r["val_score"])) for r in rows)
            result = total.compute()
            score = result["final"] if math.isfinite(result["final"]) else result["final_present"]
        for r in rows:
            r["config_oof_score"] = float(score)


def run_refit(
    experiment_dir: Path,
    space: SearchSpace,
    settings: DriverSettings,
    k: int,
    folds: tuple[int, ...],
    concurrent: int,
    resume: bool,
) -> tuple[list[dict], Path | None, pd.DataFrame | None]:
    """Refit the top `k` configs of the search in `experiment_dir` on `folds`; write members.json
    (not when the refit was interrupted: then the path is None)."""
    from geopose_ray.tune.search import fit_or_resume

    n_folds = int(space.fixed.get("n_folds", 5))
    if max(folds) >= n_folds:
        raise InputError(space.path, f"--folds {list(folds)} needs folds < n_folds ({n_folds})")
    records = report.load_trials(experiment_dir)
    tops = top_configs(records, k)
    if not tops:
        raise InputError(experiment_dir, "no finished trial with a finite score: nothing to refit")
    configs = [t.train_config for t in tops]
    max_epochs = space.scheduler.max_epochs
    reused: dict[tuple[int, int], report.TrialRecord] = {}
    jobs = []
    for rank, cfg in enumerate(configs):
        for fold in folds:
            hit = reusable(records, report.config_id(cfg), fold, max_epochs)
            if hit is not None:
                reused[rank, fold] = hit
            else:
                jobs.append((rank, fold))
    refit_settings = dataclasses.replace(settings, experiment=f"{settings.experiment}-refit")
    refit_dir = Path(settings.storage_path) / refit_settings.experiment
    board = None
    members = [
        member_row(r, rec, settings.experiment, settings.storage_path, "search")
        for (r, _), rec in reused.items()
    ]
    if jobs:
        from ray import tune

        trainable = make_trainable(refit_settings)
        exists = tune.Tuner.can_restore(str(refit_dir))
        fit_or_resume(
            lambda: build_refit_tuner(configs, jobs, trainable, refit_settings, concurrent, space),
            refit_dir,
            trainable,
            resume and exists,  # a resumed search may not have reached its refit yet
        )
        board = report.write_report(refit_dir, space, importances=False)
        if report.unfinished(board):
            log.warning("refit interrupted: members.json not written; finish it with --resume")
            return [], None, board
        for rec in report.load_trials(refit_dir):
            rank = int(rec.config["member"]["config_rank"])
            members.append(member_row(rank, rec, refit_settings.experiment, settings.storage_path, "refit"))
    members = sorted((m for m in members if m is not None), key=lambda m: (m["rank"], m["fold"]))
    add_oof_scores(members)
    path = experiment_dir / MEMBERS
    atomic_write_text(path, json.dumps(members, indent=2) + "\n")
    return members, path, board
