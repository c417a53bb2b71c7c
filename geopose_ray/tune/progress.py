"""What a Tuner prints while it runs: Ray's trial status table (every STATUS_EVERY_S, and at the
end) and one line per finished trial: its id, config in short, epochs run, best score and how it
ended (finished, stopped by ASHA, error). The Tune callback and reporter that print them live in
`tuner.py`; see `geopose_ray.console` for the rest of the console.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from geopose_ray.experiment import trial_train_config
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
    tta: float | None = None,
) -> str:
    """`trial <id>  k=v ...  epochs e/E  best s  [D4 t]  <how it ended>` for a search or a refit
    trial; `tta` is its last epoch's score through the test-time views, when it ran to the end."""
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
    if tta is not None and math.isfinite(tta):
        score += f"  with TTA {tta:.4g}"
    return f"trial {trial_id}  {' '.join(shown)}  epochs {epochs}/{max_epochs}  best {score}  {end}"


def columns(space: SearchSpace) -> list[str]:
    """Parameters for the status table: those every trial has (Tune's `Current best trial` line
    raises KeyError on a conditional one its best trial lacks)."""
    return [p.name for p in space.parameters if not p.when]
