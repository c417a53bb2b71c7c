"""The markdown tables of docs/SEARCH_VALUE.md, rendered from bench/search_value.py's JSON lines
(`python bench/search_value.py --table`): the search against the default config at equal
compute, and each model-based sampler against random search at the same number of trials, with
the verdict of docs/SEARCH_VALUE.md, 'Rule for auto' (a gain larger than the seed spread over at
least MIN_SEEDS paired seeds).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

BENCH = "search_value"
MIN_SEEDS = 3
QUICK_NOTE = "Quick figures (`--quick`): one set, one seed, a tiny budget; a check of the machinery, not the bench's result."


def spread(values: list[float]) -> float:
    return max(values) - min(values) if values else math.nan


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, (int, float)) and math.isfinite(x):
        return f"{x:.{digits}f}"
    return "-"


def _scores(rows: list[dict]) -> dict[int, float]:
    """seed -> test score (the first row of each seed; a NaN score counts as missing)."""
    out: dict[int, float] = {}
    for r in rows:
        if isinstance(r.get("score"), (int, float)) and r["seed"] not in out:
            out[r["seed"]] = float(r["score"])
    return out


def verdict(gain: float, limit: float, paired: int) -> str:
    """'yes' when the paired mean gain exceeds `limit` (the larger seed spread) over at least
    MIN_SEEDS seeds, 'no' when it does not, else how many seeds are missing."""
    if paired < MIN_SEEDS:
        return f"too few seeds ({paired} of {MIN_SEEDS})"
    return "yes" if gain > limit else "no"


def value_table(rows: list[dict]) -> list[str]:
    """Every arm of every set: its test score (mean, spread), time and compute against the
    search arm of the same set and seed; then the paired gain of the search over the config."""
    lines = ["| set | arm | sampler @ trials | seeds | test score, mean | spread (max-min) | wall, s | CPU-s "
             "| CPU-s / search's |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    search = {(r["set"], r["seed"]): r for r in rows if r["arm"] == "search"}
    for set_name, arm in sorted({(r["set"], r["arm"]) for r in rows}):
        group = [r for r in rows if (r["set"], r["arm"]) == (set_name, arm)]
        scores = list(_scores(group).values())
        ratios = [r["cpu_s"] / search[set_name, r["seed"]]["cpu_s"] for r in group if (set_name, r["seed"]) in search]
        chosen = f"{group[0]['sampler']} @ {group[0]['trials']}" if "sampler" in group[0] else f"{group[0].get('epochs')} epochs"
        lines.append(
            f"| {set_name} | {arm} | {chosen} | {len(scores)} | {fmt(mean(scores))} | {fmt(spread(scores))} "
            f"| {fmt(mean([r['wall_s'] for r in group]), 0)} | {fmt(mean([r['cpu_s'] for r in group]), 0)} "
            f"| {fmt(mean(ratios), 2)} |"
        )
    return [*lines, "", *gain_lines(rows, "search", "config", "search over the default config")]


def gain_lines(rows: list[dict], arm: str, base: str, what: str) -> list[str]:
    """Per set: the paired mean gain of `arm` over `base`, the larger spread, the verdict."""
    lines = []
    for set_name in sorted({r["set"] for r in rows}):
        a = _scores([r for r in rows if (r["set"], r["arm"]) == (set_name, arm)])
        b = _scores([r for r in rows if (r["set"], r["arm"]) == (set_name, base)])
        paired = sorted(set(a) & set(b))
        if not paired:
            continue
        gain = mean([a[s] - b[s] for s in paired])
        limit = max(spread(list(a.values())), spread(list(b.values())))
        lines.append(f"- {set_name}: {what}: {gain:+.3f} (paired, {len(paired)} seeds); larger seed spread "
                     f"{fmt(limit)}; beats it by more than the spread: {verdict(gain, limit, len(paired))}")  # fmt: skip
    return lines


def sampler_table(rows: list[dict]) -> list[str]:
    """Each model-based sampler against random search on the same set, trials and seeds."""
    lines = ["| set | trials | sampler | seeds | test score, mean | spread | random: mean | random: spread "
             "| gain (paired) | best val., mean | random: best val. | beats random by > spread |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    searches = [r for r in rows if "sampler" in r]
    for set_name, trials in sorted({(r["set"], r["trials"]) for r in searches}):
        at = [r for r in searches if (r["set"], r["trials"]) == (set_name, trials)]
        rand = [r for r in at if r["sampler"] == "random"]
        base = _scores(rand)
        for name in sorted({r["sampler"] for r in at} - {"random"}):
            model = [r for r in at if r["sampler"] == name]
            got = _scores(model)
            paired = sorted(set(got) & set(base))
            gain = mean([got[s] - base[s] for s in paired])
            limit = max(spread(list(got.values())), spread(list(base.values())))
            lines.append(
                f"| {set_name} | {trials} | {name} | {len(got)} | {fmt(mean(list(got.values())))} "
                f"| {fmt(spread(list(got.values())))} | {fmt(mean(list(base.values())))} "
                f"| {fmt(spread(list(base.values())))} | {fmt(gain)} | {fmt(mean([r['best_val'] for r in model]))} "
                f"| {fmt(mean([r['best_val'] for r in rand]))} | {verdict(gain, limit, len(paired)) if paired else 'no random arm'} |"
            )
    return lines


def render(rows: list[dict], quick: bool = False) -> list[str]:
    """Both tables from the results' rows (failed rows left out; quick rows only with `quick`)."""
    kept = [r for r in rows if r.get("bench") == BENCH and "error" not in r and bool(r.get("quick")) == quick]
    if not kept:
        return ["no results yet" + (" (quick)" if quick else "")]
    head = [QUICK_NOTE, ""] if quick else []
    return [*head, *value_table(kept), "", *sampler_table(kept)]
