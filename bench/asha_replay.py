"""Bench 3b, ASHA replay: Ray's own ASHAScheduler, fed the recorded per-epoch scores and times of a
search run without early stopping, for a grid of grace periods and reduction factors. It answers
"what would ASHA have spent, and would it have kept the best trial?" in seconds, without
training again (a full-mode `bench/asha.py` run takes an hour on 2 cores).

    python bench/asha_replay.py [--curves docs/learning/asha/no_stop_2026-11-30.json] [--orders 200]

The replay is an event simulation: `concurrent` trial slots; a trial's epoch e ends
`seconds[e]` after its previous one (the recorded time, which for epoch 1 includes its Ray
start-up); each result goes to `ASHAScheduler.on_trial_result` exactly as Tune passes it
(`epoch`, `score`), and a STOP frees the slot for the next trial. Asynchronous halving decides on
what has arrived *so far*, so the arrival order matters: the replay reports the recorded order
(the trial creation order; the space's default is always first, Optuna's `points_to_evaluate`),
and `--orders` random orders of the other trials. It reproduces the measured run: 105 of 200
epochs for grace 5 / factor 2, the ratio `bench/asha.py` measured (docs/BENCHMARKS.md).
`bench/asha.py` writes the curves file of its no-stop run (`curves_no_stop.json`).
"""

from __future__ import annotations

import heapq
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from geopose_ray.errors import InputError, run_cli

DEFAULT_CURVES = common.REPO / "docs" / "learning" / "asha" / "no_stop_2026-11-30.json"
GRID = [(g, rf) for g in (2, 3, 4, 5) for rf in (2, 3, 4)]  # (grace epochs, reduction factor)
GOAL_RATIO, GOAL_SCORE = 0.35, 0.01


@dataclass
class Trial:
    """The stand-in Tune passes to a scheduler: ASHA reads only `trial_id`."""

    trial_id: str


def curves_from_records(records: list[Any], source: str) -> dict[str, Any]:
    """The curves file of a finished search (`report.load_trials` records): trials in creation
    order (the start of their first epoch), and `concurrent`, the most that ran at once."""
    spans, trials = [], []
    for r in records:
        h = r.history.dropna(subset=["epoch", "score"])
        if h.empty:
            continue
        spans.append(
            (float(h["timestamp"].iloc[0] - h["time_this_iter_s"].iloc[0]), float(h["timestamp"].iloc[-1]))
        )
        epochs = [
            {"epoch": int(e), "score": float(s), "seconds": round(float(t), 2)}
            for e, s, t in zip(h["epoch"], h["score"], h["time_this_iter_s"], strict=True)
        ]
        trials.append({"trial_id": r.trial_id, "config": r.train_config, "epochs": epochs})
    order = sorted(range(len(trials)), key=lambda i: spans[i][0])
    concurrent = max((sum(a <= s < b for a, b in spans) for s, _ in spans), default=1)
    return {
        "source": source,
        "metric": "score",
        "mode": "max",
        "concurrent": concurrent,
        "trials": [trials[i] for i in order],
    }


def load_curves(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
        trials = data["trials"]
        if not trials or any(not t["epochs"] for t in trials):
            raise ValueError("no trials, or a trial without epochs")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(path, f"not a curves file ({e})") from None
    data.setdefault("max_epochs", max(len(t["epochs"]) for t in trials))
    return data


def replay(
    curves: dict[str, Any], order: list[int], grace: int, rf: float, signal_every: int | None = None
) -> dict[str, Any]:
    """Run Ray's ASHAScheduler (as `tune/tuner.py` builds it) over the recorded curves, trials
    arriving in `order` (indices into curves["trials"]); epochs trained and the best found.
    `signal_every`: the search's `SignalASHA` instead, its statistics re-measured every that many
    epochs (0: all alike); the curves' epochs then carry `agl_r2`, `vflow_r2`, `angle_err_deg`."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from geopose_ray.tune.signal import SIGNAL_KEYS, RungGate
    from geopose_ray.tune.tuner import SignalASHA

    max_t = int(curves["max_epochs"])
    asha = dict(
        metric="score", mode="max", time_attr="epoch", max_t=max_t, grace_period=grace, reduction_factor=rf
    )
    sched = (
        ASHAScheduler(**asha) if signal_every is None else SignalASHA(RungGate(signal_every, max_t), **asha)
    )
    trials = curves["trials"]
    queue, events, ran, clock = list(order), [], {}, 0.0

    def launch(i: int, now: float) -> None:
        sched.on_trial_add(None, Trial(str(i)))
        ran[i] = 0
        heapq.heappush(events, (now + trials[i]["epochs"][0]["seconds"], i))

    for _ in range(int(curves["concurrent"])):
        if queue:
            launch(queue.pop(0), 0.0)
    while events:
        clock, i = heapq.heappop(events)
        epochs = trials[i]["epochs"]
        ran[i] += 1
        row = epochs[ran[i] - 1]
        result = {"epoch": ran[i], "score": row["score"], **{k: row[k] for k in SIGNAL_KEYS if k in row}}
        action = sched.on_trial_result(None, Trial(str(i)), result)
        if action == TrialScheduler.STOP or ran[i] >= len(epochs):
            sched.on_trial_complete(None, Trial(str(i)), result)
            if queue:
                launch(queue.pop(0), clock)
        else:
            heapq.heappush(events, (clock + epochs[ran[i]]["seconds"], i))
    best = max(ran, key=lambda i: max(e["score"] for e in trials[i]["epochs"][: ran[i]]))
    return {
        "epochs": sum(ran.values()),
        "best": best,
        "best_score": max(e["score"] for e in trials[best]["epochs"][: ran[best]]),
        "wall_s": clock,
    }


def study(
    curves: dict[str, Any], grid: list[tuple[int, float]], orders: int, seed: int = 0
) -> list[dict[str, Any]]:
    """One record per (grace, factor): the recorded order's ratio and outcome, and the ratio's
    spread and the share of orders that keep the best trial (or a score within 0.01)."""
    trials = curves["trials"]
    full = sum(len(t["epochs"]) for t in trials)
    finals = [max(e["score"] for e in t["epochs"]) for t in trials]
    best_full = max(range(len(trials)), key=finals.__getitem__)
    rng = random.Random(seed)
    shuffles = [[0, *rng.sample(range(1, len(trials)), len(trials) - 1)] for _ in range(orders)]
    out = []
    for grace, rf in grid:
        rec = replay(curves, list(range(len(trials))), grace, rf)
        runs = [replay(curves, o, grace, rf) for o in shuffles]
        ratios = [r["epochs"] / full for r in runs]
        kept = [
            r["best"] == best_full or abs(r["best_score"] - finals[best_full]) <= GOAL_SCORE for r in runs
        ]
        out.append(
            {
                "grace": grace,
                "reduction_factor": rf,
                "ratio_recorded": rec["epochs"] / full,
                "same_best": rec["best"] == best_full,
                "best_score": rec["best_score"],
                "orders": orders,
                "ratio_mean": statistics.fmean(ratios) if ratios else float("nan"),
                "ratio_min": min(ratios, default=float("nan")),
                "ratio_max": max(ratios, default=float("nan")),
                "keeps_best": sum(kept) / len(kept) if kept else float("nan"),
                "goal_share": sum(r <= GOAL_RATIO and k for r, k in zip(ratios, kept, strict=True))
                / max(1, orders),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--curves", type=Path, default=DEFAULT_CURVES, help="a curves file (default: %(default)s)")
    p.add_argument("--orders", type=int, default=200, help="random arrival orders per setting")
    args = p.parse_args(argv)
    curves = load_curves(args.curves)
    orders = min(args.orders, 20) if args.quick else args.orders
    for row in study(curves, GRID, orders):
        common.emit("asha_replay", row.pop("ratio_recorded"), **row)
    return 0


if __name__ == "__main__":
    run_cli(main)
