"""ASHA that cuts after the learning signal (`tune/signal.py`, `tune/tuner.SignalASHA`): no trial
is judged before some trial has learned every target, and then only on re-measured epochs."""

from __future__ import annotations

import math

import pytest

from bench import asha_replay
from geopose_ray.tune.signal import RungGate, comparable, first_signal, shows_signal

LEARNING = {"agl_r2": 0.3, "vflow_r2": 0.1, "angle_err_deg": 30.0}


@pytest.mark.parametrize(
    "result, expected",
    [
        (LEARNING, True),
        ({**LEARNING, "angle_err_deg": 60.0}, False),  # the angle is still a guess
        ({**LEARNING, "vflow_r2": -0.2}, False),  # the scale or the angle is not yet learned
        ({**LEARNING, "agl_r2": -0.1}, False),  # the height is not
        ({**LEARNING, "agl_r2": math.nan}, False),
        ({"agl_r2": 0.5}, False),  # a key missing among those reported
        ({"epoch": 3, "score": 0.2}, True),  # a trainable that reports no per-target key: plain ASHA
    ],
)
def test_a_result_shows_the_signal_only_when_every_target_learns(result, expected):
    assert shows_signal(result) is expected


def test_comparable_epochs_are_those_with_re_measured_statistics():
    assert [e for e in range(1, 21) if comparable(e, 5, 20)] == [5, 10, 15, 20]
    assert [e for e in range(1, 8) if comparable(e, 0, 7)] == list(range(1, 8))
    assert comparable(7, 5, 7)  # the last epoch is always re-measured


def test_gate_judges_nothing_before_the_signal_then_each_trials_latest_comparable_score():
    gate = RungGate(every=5, max_epochs=20)
    gate.observe("a", 5, 0.1, {**LEARNING, "angle_err_deg": 80.0})
    gate.observe("b", 5, 0.4, {**LEARNING, "agl_r2": -1.0})
    assert gate.signal_epoch is None and gate.ready("a") is None and gate.ready("b") is None
    gate.observe("a", 6, 0.9, LEARNING)  # moving statistics: neither a signal nor a score to judge
    assert gate.signal_epoch is None
    gate.observe("a", 10, 0.5, LEARNING)
    assert gate.signal_epoch == 10 and gate.ready("a") == (10, 0.5)
    assert gate.ready("b") is None  # its latest comparable score (epoch 5) predates the signal
    gate.observe("c", 5, 0.3, LEARNING)  # a later trial learns sooner: the signal moves back
    assert gate.signal_epoch == 5 and gate.ready("b") == (5, 0.4) and gate.ready("c") == (5, 0.3)
    gate.forget("c")
    assert gate.ready("c") is None


def test_first_signal_reads_the_histories_as_the_gate_saw_them():
    quiet = [{"epoch": e, "score": 0.0, **LEARNING, "angle_err_deg": 80.0} for e in range(1, 21)]
    late = [
        {"epoch": e, "score": 0.0, **LEARNING, "angle_err_deg": 80.0 if e < 12 else 20.0}
        for e in range(1, 21)
    ]
    assert first_signal([quiet], 5, 20) is None
    assert first_signal([quiet, late], 5, 20) == 15  # learning from 12, first re-measured at 15
    assert first_signal([quiet, late], 0, 20) == 12


def _curves(trials: list[tuple[list[float], int]], max_epochs: int = 8) -> dict:
    """Replay curves: (scores per epoch, the epoch from which the trial has learned every target)."""
    return {
        "concurrent": 2,
        "max_epochs": max_epochs,
        "trials": [
            {
                "trial_id": str(i),
                "epochs": [
                    {
                        "epoch": e + 1,
                        "score": s,
                        "seconds": 1.0,
                        **LEARNING,
                        "angle_err_deg": 20.0 if e + 1 >= at else 85.0,
                    }
                    for e, s in enumerate(scores)
                ],
            }
            for i, (scores, at) in enumerate(trials)
        ],
    }


def test_signal_asha_keeps_the_best_trial_that_plain_asha_cuts_on_noise():
    """Before the targets learn, the eventual best trial scores lowest (noise); plain ASHA with a
    rung at epoch 2 stops it there, the gated ASHA waits for the signal (epoch 4) and stops the
    others instead."""
    noisy_good = [0.3, 0.3, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3]
    late_best = [-0.5, -0.4, 0.1, 0.5, 0.6, 0.7, 0.75, 0.8]
    weak = [0.2, 0.25, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    curves = _curves([(noisy_good, 4), (weak, 4), (late_best, 4), (weak, 4)])
    plain = asha_replay.replay(curves, [0, 1, 2, 3], grace=2, rf=2)
    gated = asha_replay.replay(curves, [0, 1, 2, 3], grace=2, rf=2, signal_every=2)
    assert plain["best"] != 2  # the late learner was cut on its epoch-2 noise
    assert gated["best"] == 2 and gated["best_score"] == pytest.approx(0.8)
    assert gated["epochs"] < 4 * 8  # and the gate still cut once the rungs could rank


def test_signal_asha_cuts_nothing_where_no_trial_learns():
    flat = [0.1, 0.0, -0.1, 0.05, 0.0, 0.1, 0.0, 0.02]
    curves = _curves([(flat, 99), ([s - 0.2 for s in flat], 99), (flat, 99)])
    assert asha_replay.replay(curves, [0, 1, 2], grace=2, rf=2)["epochs"] < 3 * 8
    assert asha_replay.replay(curves, [0, 1, 2], grace=2, rf=2, signal_every=2)["epochs"] == 3 * 8
