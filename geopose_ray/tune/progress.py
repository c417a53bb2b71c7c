"""What a Tuner prints while it runs: Ray's trial status table (every STATUS_EVERY_S, and at the
end) and one line per finished trial: its id, config in short, epochs run, best score and how it
ended (finished, stopped by ASHA, error). See `geopose_ray.console` for the rest of the console.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ray import tune

from geopose_ray import console
from geopose_ray.tune.driver import METRIC, MODE, trial_train_config
from geopose_ray.tune.space import SearchSpace

STATUS_EVERY_S = 60  # seconds between two status tables (a 3-minute search shows a few)


def short_value(v: Any) -> str:
    """A config value in a few characters: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_line(
    trial_id: str,
    config: dict[str, Any],
    params: Sequence[str],
    epochs: int,
    max_epochs: int,
    best: float | None,
    error: bool = False,
) -> str:
    """`trial <id>  k=v ...  epochs e/E  best s  <how it ended>` for a search or a refit trial."""
    cfg = trial_train_config(config)
    shown = [f"{k}={short_value(cfg[k])}" for k in params if k in cfg]
    if "member" in config:  # a refit trial: which config and fold it trains
        shown.insert(0, f"refit #{config['member']['config_rank']} fold {cfg.get('fold')}")
    if error:
        end = "ERROR (traceback above)"
    elif epochs < max_epochs:
        end = "stopped by ASHA"
    else:
        end = "finished"
    score = "-" if best is None or not math.isfinite(best) else f"{best:.4g}"
    return f"trial {trial_id}  {' '.join(shown)}  epochs {epochs}/{max_epochs}  best {score}  {end}"


class TrialLines(tune.Callback):
    """Prints `trial_line` when a trial ends. Stateless (it reads the trial's own metric summary),
    so it works unchanged after `Tuner.restore`."""

    def __init__(self, params: Sequence[str], max_epochs: int):
        self.params = list(params)
        self.max_epochs = max_epochs

    def _line(self, trial: Any, error: bool) -> str:
        stats = getattr(trial, "metric_analysis", {}) or {}
        last = trial.last_result or {}
        epochs = int(stats.get("epoch", {}).get("max", last.get("epoch", 0)) or 0)
        best = stats.get(METRIC, {}).get(MODE)
        return trial_line(trial.trial_id, trial.config, self.params, epochs, self.max_epochs, best, error)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(self._line(trial, error=False), flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(self._line(trial, error=True), flush=True)


def columns(space: SearchSpace) -> list[str]:
    """Parameters for the status table: those every trial has (Tune's `Current best trial` line
    raises KeyError on a conditional one its best trial lacks)."""
    return [p.name for p in space.parameters if not p.when]


def run_config_kwargs(params: Sequence[str], max_epochs: int, columns: Sequence[str]) -> dict[str, Any]:
    """`tune.RunConfig` arguments: the TrialLines callback, and when `console.setup` chose the
    terse engine, verbose=1 with a CLIReporter showing `columns` (parameters) plus epoch and score."""
    kwargs: dict[str, Any] = {"callbacks": [TrialLines(params, max_epochs)]}
    if console.quiet():
        kwargs["verbose"] = 1
        kwargs["progress_reporter"] = tune.CLIReporter(
            metric_columns=["epoch", METRIC],
            parameter_columns=list(columns),
            max_report_frequency=STATUS_EVERY_S,
            print_intermediate_tables=True,  # verbose=1 alone prints only the trial counts
            metric=METRIC,
            mode=MODE,
            sort_by_metric=True,
        )
    return kwargs
