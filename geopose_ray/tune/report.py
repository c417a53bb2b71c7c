"""What a finished (or interrupted) experiment shows a user, rebuilt from Tune's files on disk:
`leaderboard.csv` (+ the same table printed), `best_config.yaml`, Optuna parameter importances
and PNG plots, all written atomically into the experiment folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from geopose_ray.atomic import atomic_path, atomic_write_json, atomic_write_text, json_safe
from geopose_ray.experiment import (
    BEST_CONFIG,
    IMPORTANCES,
    LEADERBOARD,
    METRIC,
    SCORE_BY_PARAM,
    SCORE_VS_EPOCH,
    config_id,
    trial_train_config,
)
from geopose_ray.redact import mask_text
from geopose_ray.tune.signal import comparable, first_signal
from geopose_ray.tune.space import SearchSpace


@dataclass
class TrialRecord:
    """One Tune trial as read back from disk: its config, status and per-epoch history."""

    trial_id: str
    status: str  # TERMINATED | ERROR | RUNNING | PENDING | PAUSED
    config: dict[str, Any]  # Tune's trial config (search: flat; refit: refit_configs + member)
    history: pd.DataFrame  # one row per report: epoch, score, val_loss, node_id, ...
    path: str

    @property
    def train_config(self) -> dict[str, Any]:
        return trial_train_config(self.config)

    def best(self) -> tuple[float, int]:
        """(best score, its epoch); (nan, 0) when no finite score was reported."""
        if METRIC not in self.history or self.history[METRIC].isna().all():
            return math.nan, 0
        row = self.history.loc[self.history[METRIC].idxmax()]
        return float(row[METRIC]), int(row.get("epoch", 0))

    def epochs_run(self) -> int:
        return int(self.history["epoch"].max()) if "epoch" in self.history and len(self.history) else 0

    def last(self, key: str) -> Any:
        if key not in self.history or self.history[key].dropna().empty:
            return None
        return self.history[key].dropna().iloc[-1]


def load_trials(experiment_dir: str | Path) -> list[TrialRecord]:
    """Every trial of a Tune experiment (a folder or a URI), finished or not (no running Ray needed)."""
    from geopose_ray.tune.tuner import read_trials

    return [TrialRecord(*row) for row in read_trials(experiment_dir)]


def signal_epoch(records: list[TrialRecord], space: SearchSpace) -> int | None:
    """The epoch from which ASHA could cut (`signal.first_signal`), read from the histories."""
    rows = [r.history.dropna(subset=["epoch"]).to_dict("records") for r in records if "epoch" in r.history]
    return first_signal(rows, space.remeasure_every(), space.scheduler.max_epochs)


def leaderboard(records: list[TrialRecord], space: SearchSpace) -> pd.DataFrame:
    """One row per trial, best score first: where and how long it ran, and its searched values."""
    max_epochs = space.scheduler.max_epochs
    rows = []
    for r in records:
        cfg = r.train_config
        score, best_epoch = r.best()
        epochs = r.epochs_run()
        row: dict[str, Any] = {
            "trial_id": r.trial_id,
            "fold": cfg.get("fold"),
            "score": score,
            "score_tta": r.last("score_tta"),  # after the last epoch, the product's views (D4)
            "best_epoch": best_epoch,
            "epochs_run": epochs,
            # against the trial's own budget: a refit may train more or fewer epochs than the space
            "stopped_early": r.status == "TERMINATED" and epochs < int(cfg.get("epochs", max_epochs)),
            "status": r.status,
            "node_id": r.last("node_id"),
            "worker_node_ids": r.last("worker_node_ids"),
            "config_id": config_id(cfg),
        }
        if "member" in r.config:
            row["config_rank"] = r.config["member"]["config_rank"]
        row.update({name: cfg.get(name) for name in space.searched()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values("score", ascending=False, na_position="last").reset_index(drop=True)


def unfinished(board: pd.DataFrame) -> int:
    """Trials neither finished nor errored: the run was interrupted (Ctrl-C, a killed driver)."""
    return 0 if board.empty else int((~board["status"].isin(["TERMINATED", "ERROR"])).sum())


def format_table(board: pd.DataFrame) -> str:
    """The leaderboard as printed at the end of a run (short ids, no node columns)."""
    if board.empty:
        return "(no trials)"
    shown = board.drop(columns=[c for c in ("worker_node_ids", "config_id") if c in board])
    if "node_id" in shown:
        shown = shown.assign(node_id=shown["node_id"].map(lambda n: str(n)[:8] if isinstance(n, str) else n))
    with pd.option_context(
        "display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format
    ):
        return shown.to_string(index=False)


def param_importances(study: tuple[str, str]) -> dict[str, Any]:
    """`optuna.importance.get_param_importances` on the search's own study (storage URL, name):
    every finished trial with the score it ended on, as the sampler saw it."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        loaded = optuna.load_study(study_name=study[1], storage=study[0])
        done = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
        importances = optuna.importance.get_param_importances(loaded)
    except (KeyError, ValueError, RuntimeError) as e:  # KeyError: no such study
        return {"importances": {}, "trials": 0, "note": f"not computable: {mask_text(str(e))}"}  # no password
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {"importances": {k: float(v) for k, v in importances.items()}, "trials": len(done)}


def score_floor(scores: Any) -> float | None:
    """Lower plot limit: R² scores of diverged trials reach -1e8 and would flatten the others,
    so scores below -1 are drawn at -1 (when any trial did better than that)."""
    finite = np.asarray(scores, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size and finite.max() > -1.0 and finite.min() < -1.0:
        return -1.0
    return None


def score_vs_epoch_figure(records: list[TrialRecord]) -> Any:
    """Every trial's validation at the epochs it validated. Where a trial re-measured its BatchNorm statistics on
    whole tiles every `precise_bn_every` epochs (the search's trials, for ASHA's rungs), those
    epochs, the ones ASHA and the ranking read (`signal.comparable`), are dots on a faint line
    through the others: between re-measures the crops' moving statistics can read -1 where the
    model scores 0.5 (docs/LEARNING.md, 'What the rungs of ASHA compare')."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    has = [r for r in records if METRIC in r.history and "epoch" in r.history]
    floor = score_floor(np.concatenate([r.history[METRIC].to_numpy(float) for r in has]) if has else [])
    dotted = False
    for r in has:
        x = r.history["epoch"].to_numpy(int)
        y = r.history[METRIC].to_numpy(float)
        y = y if floor is None else np.maximum(y, floor)
        last = int(r.train_config.get("epochs") or x.max())
        # epochs that skip validation (`val_every`) repeat the last one's figures: not drawn
        val_every = int(r.train_config.get("val_every") or 1)
        shown = np.array([e == x[0] or comparable(int(e), val_every, last) for e in x], bool)
        x, y = x[shown], y[shown]
        every = int(r.train_config.get("precise_bn_every") or 0)
        if every <= 0:
            ax.plot(x, y, marker="o", label=r.trial_id)
            continue
        (line,) = ax.plot(x, y, alpha=0.3, linewidth=1)
        dots = np.array([comparable(int(e), every, last) for e in x], bool)
        ax.plot(x[dots], y[dots], marker="o", color=line.get_color(), label=r.trial_id)
        dotted = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    label = "validation score" + ("" if floor is None else " (below -1 drawn at -1)")
    ax.set_ylabel(label + ("\ndots: statistics re-measured on whole tiles" if dotted else ""))
    if has and len(has) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def plot_score_vs_epoch(records: list[TrialRecord], path: Path) -> None:
    _save(score_vs_epoch_figure(records), path)


def plot_score_by_param(board: pd.DataFrame, space: SearchSpace, path: Path) -> None:
    """Best score of every trial against each searched parameter's value (categories as strips)."""
    from matplotlib.figure import Figure

    names = [n for n in space.searched() if n in board and board[n].notna().any()] or ["(none)"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    params = {p.name: p for p in space.parameters}
    for ax, name in zip(axes, names):
        if name in params:
            data = board[[name, "score"]].dropna()
            p = params[name]
            if p.type == "choice":
                cats = [str(v) for v in p.values]
                x = data[name].astype(str).map({c: i for i, c in enumerate(cats)})
                ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=7)
            else:
                x = data[name].astype(float)
                if p.log or p.type == "loguniform":
                    ax.set_xscale("log")
            floor = score_floor(data["score"])
            y = data["score"] if floor is None else data["score"].clip(lower=floor)
            ax.scatter(x, y, alpha=0.7)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("best score")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")


def best_config(board: pd.DataFrame, records: list[TrialRecord]) -> dict[str, Any] | None:
    """Flat config of the best trial (None when no trial reported a finite score)."""
    if board.empty or not math.isfinite(board["score"].iloc[0]):
        return None
    best_id = board["trial_id"].iloc[0]
    return next(r.train_config for r in records if r.trial_id == best_id)


def write_report(
    experiment_dir: str | Path,
    space: SearchSpace,
    study: tuple[str, str] | None = None,
    records: list[TrialRecord] | None = None,
) -> pd.DataFrame:
    """Write every report file into `experiment_dir`; returns the leaderboard. The parameter
    importances come from the Optuna `study` (storage URL, name); refits have none (their configs
    were picked, not sampled). `records`: the folder's trials when the caller already read them
    (from a remote experiment: `experiment_dir` is then its local mirror, see `Experiment.push`)."""
    exp = Path(experiment_dir)
    records = load_trials(exp) if records is None else records
    board = leaderboard(records, space)
    with atomic_path(exp / LEADERBOARD) as tmp:
        board.to_csv(tmp, index=False)
    best = best_config(board, records)
    if best is not None:
        header = f"# best trial {board['trial_id'].iloc[0]}: score {board['score'].iloc[0]:.5f}\n"
        body = yaml.safe_dump(json_safe(best), sort_keys=False)
        atomic_write_text(exp / BEST_CONFIG, header + body)
    if space.parameters and study is not None:
        atomic_write_json(exp / IMPORTANCES, param_importances(study))
        plot_score_by_param(board, space, exp / SCORE_BY_PARAM)
    plot_score_vs_epoch(records, exp / SCORE_VS_EPOCH)
    return board

