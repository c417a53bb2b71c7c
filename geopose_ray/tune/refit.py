"""Fold refits: the K best configs of a search (run on one fold) trained on every requested fold
to the full epoch budget, with no early stopping; the runs become the ensemble's members.

A second Tuner (`<name>-refit`) runs a grid over (config_rank, fold) with the FIFO scheduler.
A search trial that already ran the full budget on one of those folds *is* that refit run (same
config, fold and epochs; ASHA only ever stops trials early), so it is reused, not retrained. So is
such a trial on the search's own fold, as a member that predicts the test tiles only: its fold's
tiles chose the config, so its out-of-fold predictions are left out of every out-of-fold figure
(`add_oof_scores`; the ensemble's `oof_items`), while its model, trained like a refit, still
averages into the delivered prediction for free.
`<storage>/<name>/members.json` lists every member and its best checkpoint (by score; a path, or
a URI when the storage is remote). The paths come from `geopose_ray.experiment`, the Tuner from
`tuner.py`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from geopose_ray import storage
from geopose_ray.atomic import atomic_write_json, json_safe
from geopose_ray.checkpoint import VAL_SCORE_FILE
from geopose_ray.errors import InputError
from geopose_ray.experiment import MEMBERS, REPORT_FILES, Experiment, config_id
from geopose_ray.metrics import GeoposeScore
from geopose_ray.tune import refit_choice, report, trainer, tuner
from geopose_ray.tune.space import SearchSpace

log = logging.getLogger(__name__)


def top_configs(records: list[report.TrialRecord], k: int) -> list[report.TrialRecord]:
    """Best trial of each of the `k` best distinct configs (finished trials, finite score)."""
    best: dict[str, report.TrialRecord] = {}
    for r in records:
        score = r.best()[0]
        if r.status != "TERMINATED" or not math.isfinite(score):
            continue
        cid = config_id(r.train_config)
        if cid not in best or score > best[cid].best()[0]:
            best[cid] = r
    return sorted(best.values(), key=lambda r: r.best()[0], reverse=True)[:k]


def seed_replicas(configs: list[dict], seeds: int) -> list[dict]:
    """The configs, then each again with training seeds +1 .. +seeds-1 (ranks follow this order).

    Short runs from scratch move by +-0.03 in score from seed to seed (docs/LEARNING.md): the
    mean of two runs of the best config removes part of that noise, which a blend of the best
    config with weaker ones cannot. The replicas are members with a config of their own (the
    seed is part of its identity), trained like any refit."""
    replicas = [{**c, "seed": int(c.get("seed", 0)) + i} for i in range(1, seeds) for c in configs]
    return list(configs) + replicas


def with_epochs(configs: list[dict], epochs: int | None) -> list[dict]:
    """The configs trained for `epochs` (None: unchanged, the space's max_epochs). On a data set
    where the search's budget leaves the model undertrained, a longer refit of the best config
    gains more than a second seed (docs/LEARNING.md: 0.251 -> 0.413 on validation for twice the
    epochs). The epoch count is part of a config's identity, like the seed. A refit has no ASHA
    rung to re-measure statistics for (`precise_bn_every`, a run key): only its last epoch does."""
    return [{**c, "precise_bn_every": 0, **({} if epochs is None else {"epochs": int(epochs)})} for c in configs]


def reusable(
    records: list[report.TrialRecord], cid: str, fold: int, max_epochs: int
) -> report.TrialRecord | None:
    """The best search trial of config `cid` that ran the whole budget on `fold`, if any."""
    done = [
        r
        for r in records
        if r.status == "TERMINATED"
        and r.epochs_run() >= max_epochs
        and config_id(r.train_config) == cid
        and int(r.train_config.get("fold", -1)) == fold
    ]
    return max(done, key=lambda r: r.best()[0], default=None)


def best_with_val_score(exp: Experiment, rec: report.TrialRecord) -> tuple[str | None, float, str | None]:
    """(best checkpoint, its score, its fold's metric accumulators file or None) of a trial."""
    path, score = trainer.best_checkpoint(exp.train_run(rec.trial_id))
    if path is None:
        return None, score, None
    val_score = storage.join(path, VAL_SCORE_FILE)  # this fold's metric accumulators (out-of-fold)
    return path, score, val_score if storage.is_file(val_score) else None


def member_row(rank: int, rec: report.TrialRecord, exp: Experiment, source: str) -> dict | None:
    cfg = rec.train_config
    path, score, val_score = best_with_val_score(exp, rec)
    if path is None:
        log.warning("trial %s of %s has no checkpoint: not a member", rec.trial_id, exp.name)
        return None
    return {
        "rank": rank,
        "config_id": config_id(cfg),
        "fold": int(cfg["fold"]),
        "trial_id": rec.trial_id,
        "experiment": exp.name,
        "source": source,  # "search" (reused full-budget trial) or "refit"
        "score": score if math.isfinite(score) else rec.best()[0],
        "checkpoint": path,
        "val_score": val_score,
        "config": json_safe(cfg),
    }


def add_selection(members: list[dict], tops: list[report.TrialRecord], fold: int) -> None:
    """Each member gets what chose its config: the search's fold (`selection_fold`) and the
    config's best score there (`search_score`, single view), and, when its trial ran to the end,
    its last epoch's score through the test-time views (`search_score_tta`); both after the
    trial's `search_epochs`. Read beside the member's own out-of-fold score, it shows how
    optimistic the search's figure was (the ensemble's calibration lines). Seed replicas follow
    their config (`seed_replicas`' rank order)."""
    for m in members:
        top = tops[m["rank"] % len(tops)]
        m["selection_fold"] = fold
        m["search_score"] = float(top.best()[0])
        tta = top.last("score_tta")  # after the trial's last epoch, through the product's views
        m["search_score_tta"] = None if tta is None else float(tta)
        m["search_epochs"] = int(top.last("epoch") or 0)  # the budget behind both: the members may train longer


def add_oof_scores(members: list[dict]) -> None:
    """Each member gets `config_oof_score`: the official score of its config over all its folds'
    validation tiles at once, from the summed accumulators (the metric is a sum of per-city
    statistics, so this equals scoring the pooled out-of-fold predictions; no re-run). The
    search's fold (`selection_fold`, set by `add_selection`) is left out: its tiles chose the
    config. NaN when a fold's accumulators are missing, or the config has no other fold. The
    ensemble job still predicts out-of-fold itself, with its TTA, to fit blend weights: those
    need the predictions, not only their statistics."""
    by_config: dict[str, list[dict]] = {}
    for m in members:
        by_config.setdefault(m["config_id"], []).append(m)
    for rows in by_config.values():
        score = math.nan
        honest = [r for r in rows if not selects(r)]
        if honest and all(r["val_score"] for r in honest):
            total = sum(GeoposeScore.from_array(_load_npy(r["val_score"])) for r in honest)
            result = total.compute()
            score = result["final"] if math.isfinite(result["final"]) else result["final_present"]
        for r in rows:
            r["config_oof_score"] = float(score)


def selects(member: dict) -> bool:
    """Whether a member's validation fold is the one whose tiles chose its config."""
    return int(member["fold"]) == int(member.get("selection_fold", -1))


def choose_configs(exp: Experiment, records: list[report.TrialRecord], k: int) -> list[tuple[report.TrialRecord, str]]:
    """The `k` configs to refit (`refit_choice.choose` over every finished config), each with why."""
    choice = refit_choice.choose(
        top_configs(records, len(records)), k, lambda r: search_cities(exp, r), lambda r: r.train_config
    )
    for rec, why in choice:
        log.info("refit %s (%s): %s", rec.trial_id, config_id(rec.train_config), why)
    return choice


def search_cities(exp: Experiment, rec: report.TrialRecord) -> dict[str, float] | None:
    """Per-city scores of a search trial's best checkpoint on the search's fold (its saved metric
    accumulators), or None when it kept none: what `refit_choice` compares configs by."""
    val_score = best_with_val_score(exp, rec)[2]
    return None if val_score is None else GeoposeScore.from_array(_load_npy(val_score)).compute()["cities"]


def _load_npy(location: str) -> np.ndarray:
    """An .npy file from a path or a URI (a few hundred numbers: read directly, not cached)."""
    return np.load(io.BytesIO(storage.read_bytes(location)))


def plan_jobs(
    records: list[report.TrialRecord], configs: list[dict], folds: tuple[int, ...], max_epochs: int
) -> tuple[dict[tuple[int, int], report.TrialRecord], list[tuple[int, int]]]:
    """({(rank, fold): the search trial that already is that refit}, [(rank, fold) to train])."""
    reused: dict[tuple[int, int], report.TrialRecord] = {}
    jobs = []
    for rank, cfg in enumerate(configs):
        for fold in folds:
            hit = reusable(records, config_id(cfg), fold, max_epochs)
            if hit is not None:
                reused[rank, fold] = hit
            else:
                jobs.append((rank, fold))
    return reused, jobs


def idle_cores(settings: trainer.DriverSettings, slots: int, jobs: int) -> dict:
    """More CPUs and torch threads per refit when fewer refits than trial slots remain (a CPU
    search refits one fold by default, on a machine that ran two trials at once): the same
    config trained on 2 cores instead of 1 takes 0.72x the time per epoch (docs/BENCHMARKS.md).
    GPU trials and configs that leave torch its own thread count are unchanged."""
    res = settings.resources
    factor = slots // max(1, jobs)
    if factor <= 1 or res.gpus_per_worker > 0:
        return {}
    return {"resources": dataclasses.replace(res, cpus_per_worker=res.cpus_per_worker * factor), "thread_factor": factor}


def run_refit(
    exp: Experiment,
    space: SearchSpace,
    settings: trainer.DriverSettings,
    k: int,
    folds: tuple[int, ...],
    concurrent: int,
    resume: bool,
    train_fn: trainer.WorkerFn | None = None,
    seeds: int = 1,
    epochs: int | None = None,
) -> tuple[list[dict], Path | None, pd.DataFrame | None]:
    """Refit `k` configs of the search `exp` (the best, then others as `refit_choice` picks) on
    `folds`, each with `seeds` training seeds (`seed_replicas`) and `epochs` epochs (`with_epochs`;
    None: the space's max_epochs, so the search's own trials on those folds are reused); write its
    members.json (not when the refit was interrupted: then the path is None). `train_fn`: see
    `trainer.build_trainer`."""
    n_folds = space.n_folds()
    if max(folds) >= n_folds:
        raise InputError(space.path, f"--folds {list(folds)} needs folds < n_folds ({n_folds})")
    records = report.load_trials(exp.location)
    choice = choose_configs(exp, records, k)
    tops = [rec for rec, _ in choice]
    if not tops:
        raise InputError(exp.location, "no finished trial with a finite score: nothing to refit")
    configs = with_epochs(seed_replicas([t.train_config for t in tops], seeds), epochs)
    budget = epochs or space.scheduler.max_epochs
    reused, jobs = plan_jobs(records, configs, folds, budget)
    search_fold = int(space.fixed.get("fold", 0))
    reused.update(plan_jobs(records, configs, (search_fold,), budget)[0])  # test-only members, free
    board = None
    members = [member_row(r, rec, exp, "search") for (r, _), rec in reused.items()]
    if jobs:
        refit = exp.refit
        settings = dataclasses.replace(settings, experiment=refit.name, **idle_cores(settings, concurrent, len(jobs)))
        trainable = trainer.make_trainable(settings, train_fn)
        root = str(refit.storage)
        tuner.fit_or_resume(
            lambda: tuner.build_refit_tuner(configs, jobs, trainable, refit.name, root, concurrent, space, budget),
            refit.location,
            trainable,
            resume and tuner.can_restore(refit.location),  # a resumed search may not have reached its refit yet
        )
        refit_records = report.load_trials(refit.location)
        board = report.write_report(refit.dir, space, records=refit_records)
        refit.push(*REPORT_FILES)
        if report.unfinished(board):
            log.warning("refit interrupted: members.json not written; finish it with --resume")
            return [], None, board
        for rec in refit_records:
            rank = int(rec.config["member"]["config_rank"])
            members.append(member_row(rank, rec, refit, "refit"))
    members = sorted((m for m in members if m is not None), key=lambda m: (m["rank"], m["fold"]))
    add_selection(members, tops, int(space.fixed.get("fold", 0)))
    for m in members:  # why the config was refit (seed replicas follow their config's rank)
        m["chosen_as"] = choice[m["rank"] % len(choice)][1]
    add_oof_scores(members)
    atomic_write_json(exp.members, members)
    exp.push(MEMBERS)
    return members, exp.members, board
