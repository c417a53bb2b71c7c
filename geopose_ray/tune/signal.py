"""When ASHA may cut: only after some trial shows every target learning.

A rung of ASHA ranks the trials by their validation score at that epoch. Before the targets have
started to learn, those scores rank noise: on a tall, sparse tune set the scores of five configs
at epochs 5 and 10 correlated with their final ranking at 0.10 and -0.50, at epoch 15 at 1.00
(docs/LEARNING.md, 'What the rungs of ASHA compare'), while on the embedded set every target
learns by epoch 4-5. So the first rung is not a constant: it is read off the trials themselves,
which probe the data for free.

`RungGate` watches every result. A result *shows the signal* when the AGL R² and the vflow R²
are above 0 (better than each city's mean) and the mean angle error is below 45° (a guess
averages 90°): the height, the scale and the angle have each started to learn. Only results at
*comparable* epochs count: those whose BatchNorm statistics were re-measured on whole tiles
(multiples of `every`, the search's `precise_bn_every`, and the last epoch), as the rungs read
them. The earliest comparable epoch at which any trial showed the signal is the signal epoch;
from then on ASHA sees each trial's latest comparable score at or after it, and before it sees
nothing, so no trial is cut on noise. Where no trial ever shows the signal, ASHA cuts nothing.

A trainable that reports none of the per-target keys (a test's stand-in) opens the gate at its
first comparable epoch: plain ASHA. Ray-free: `tuner.SignalASHA` applies it, the report
(`first_signal`) reads it back from the trials' histories.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SIGNAL_KEYS = ("agl_r2", "vflow_r2", "angle_err_deg")
MAX_ANGLE_ERR_DEG = 45.0  # half a guess's mean error
RULE = f"AGL R2 > 0, vflow R2 > 0 and angle error < {MAX_ANGLE_ERR_DEG:g} deg in some trial"


def shows_signal(result: Mapping[str, Any]) -> bool:
    """Whether one validation shows every target learning (see the module doc); True for a
    result that carries none of the per-target keys."""
    if not any(k in result for k in SIGNAL_KEYS):
        return True
    try:
        agl, vflow, angle = (float(result[k]) for k in SIGNAL_KEYS)
    except (KeyError, TypeError, ValueError):
        return False
    if not all(math.isfinite(v) for v in (agl, vflow, angle)):
        return False
    return agl > 0.0 and vflow > 0.0 and angle < MAX_ANGLE_ERR_DEG


def comparable(epoch: int, every: int, max_epochs: int) -> bool:
    """Whether a validation at `epoch` used re-measured statistics, as the rungs' do (`every` 0:
    none is re-measured before the last, so every epoch is alike)."""
    return every <= 0 or epoch % every == 0 or epoch >= max_epochs


@dataclass
class RungGate:
    """The signal epoch and each trial's latest comparable score; pickles with the scheduler."""

    every: int  # epochs between re-measured statistics (precise_bn_every); 0: all alike
    max_epochs: int
    signal_epoch: int | None = None
    latest: dict[str, tuple[int, float]] = field(default_factory=dict)  # trial id -> (epoch, score)

    def observe(self, trial_id: str, epoch: int, score: float, result: Mapping[str, Any]) -> None:
        if not comparable(epoch, self.every, self.max_epochs):
            return
        self.latest[trial_id] = (epoch, score)
        if shows_signal(result) and (self.signal_epoch is None or epoch < self.signal_epoch):
            self.signal_epoch = epoch

    def ready(self, trial_id: str) -> tuple[int, float] | None:
        """The (epoch, score) ASHA should judge `trial_id` by now, or None while it may not."""
        got = self.latest.get(trial_id)
        if got is None or self.signal_epoch is None or got[0] < self.signal_epoch:
            return None
        return got

    def forget(self, trial_id: str) -> None:
        self.latest.pop(trial_id, None)


def first_signal(histories: Iterable[Iterable[Mapping[str, Any]]], every: int, max_epochs: int) -> int | None:
    """The signal epoch of a finished search, from each trial's per-epoch reports (the report's
    reading of what the gate saw), or None when no trial showed it."""
    epochs = [
        int(row["epoch"])
        for rows in histories
        for row in rows
        if comparable(int(row["epoch"]), every, max_epochs) and shows_signal(row)
    ]
    return min(epochs) if epochs else None
