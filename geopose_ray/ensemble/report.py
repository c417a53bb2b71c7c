"""The ensemble's report: the JSON written beside the submission (`ensemble_report.json`) and
what the console shows of it (the blend table, then the submission or why it was refused).
Ray-free: the job (`job.py`) computes the numbers; this module arranges, writes and words them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from geopose_ray.atomic import atomic_write_json, json_safe
from geopose_ray.ensemble.diversity import diversity_line
from geopose_ray.ensemble.members import Member, oof_folds
from geopose_ray.metrics import GeoposeScore
from geopose_ray.uncertainty import gap_noise, interval

REPORT_JSON = "ensemble_report.json"


def add_test_scores(report: dict[str, Any], results: dict[str, dict]) -> dict[str, Any]:
    """`report` with its test-truth table (`test_table`, from the test actors' `results`), each
    member config's own test score in its row, and the calibration; returns it."""
    report["test"] = test_table(results, report["test_score"])
    for row, score in zip(report["configs"], (report["test"] or {}).get("members", [])):
        row["test"] = score
    report["calibration"] = calibration(report)
    return report


def write_report(out_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """`report` as strict JSON (non-finite numbers as null) in `out_dir/ensemble_report.json`;
    returns what was written."""
    report = json_safe(report)
    atomic_write_json(Path(out_dir) / REPORT_JSON, report)
    return report


def submission_lines(report: dict[str, Any]) -> list[str]:
    """After the blend table: the archive and its official score, or why it was refused (its
    path is shown only once `check_submission` accepted it)."""
    if not report["valid"]:
        return ["submission INVALID:", *(f"  {p}" for p in report["problems"])]
    lines = [f"submission: {report['archive']}"]
    if report["test_score"] is not None:
        lines.append(f"official score on the synthetic test truth: {report['test_score']['final']:.4f}")
    return lines


def test_table(results: dict[str, dict], official: dict[str, Any] | None) -> dict[str, Any] | None:
    """Test-truth scores from the test actors' `truth_sums`: each member config alone, the plain
    mean, the blend (`blend`: the official score of the archive; `blend_from_actors`: the same
    from the actors' sums, which shows both are scored alike) and the blend's gain over the best
    member. None when no test tile has truth."""
    scored = [r for r in results.values() if r.get("sums")]
    if not scored:
        return None

    def score(pick: Any) -> float:
        total = GeoposeScore()
        for r in scored:
            total.add_image_sums(r["city"], np.asarray(pick(r["sums"])))
        return float(total.compute()["final"])

    members = [score(lambda s, i=i: s["members"][i]) for i in range(len(scored[0]["sums"]["members"]))]
    blend_rows = np.array([r["sums"]["blend"] for r in scored])  # (N, N_FIELDS)
    places = np.array([str(r.get("place") or r.get("id") or i) for i, r in enumerate(scored)])
    spread = interval(blend_rows, np.array([r["city"] for r in scored]), places)
    best = max((m for m in members if math.isfinite(m)), default=math.nan)
    blend = float(official["final"]) if official else math.nan
    return {
        "tiles": len(scored),
        "members": members,
        "plain_mean": score(lambda s: s["plain_mean"]),
        "blend": blend,
        "blend_from_actors": score(lambda s: s["blend"]),
        "best_member": best,
        "gain": blend - best,
        "blend_interval": spread,  # the test's own sampling noise over its places
    }


def blend_table(report: dict[str, Any]) -> list[str]:
    """The console's blend table: OOF and test score of every member config, of the plain mean
    and of the fitted blend (its cross-fitted OOF score), then `best member test X  blend test Y
    (gain +Z)` when there is truth, and the members' error correlation (`diversity_line`)."""
    fit, test = report["oof"], report.get("test") or {}

    def row(name: str, folds: str, oof: Any, score: Any) -> str:
        return f"  {name:<24} {folds:<8} {_num(oof):>10} {_num(score):>10}"

    lines = [
        f"blend table (OOF: {fit.get('tiles', 0)} tiles, {fit.get('validation', '-')}; "
        f"test: {test.get('tiles', 0)} tiles with truth)",
        f"  {'member config':<24} {'folds':<8} {'OOF':>10} {'test':>10}",
    ]
    if any(c.get("oof_folds", c["folds"]) != c["folds"] for c in report["configs"]):
        lines.insert(1, "  (+k: a member on the search's fold k, which chose the config: test tiles only)")
    for c in report["configs"]:
        lines.append(row(c["config_id"], _folds(c), c["oof"], c.get("test")))
    lines.append(row("plain mean", "", fit.get("plain_mean"), test.get("plain_mean")))
    kept = ", ".join(fit.get("kept") or []) or "none"
    # OOF: the cross-fitted score that chose the refinements (tiles scored by parameters fitted
    # on other tiles), not the final parameters' in-sample score, which flatters them
    oof = fit.get("judged", fit.get("blend"))
    lines.append(
        row("blend", "", oof, test.get("blend")) + f"  kept: {kept} (in-sample OOF {_num(fit.get('blend'))})"
    )
    if test.get("blend") is not None and test.get("best_member") is not None:
        lines.append(
            f"best member test {_num(test['best_member'])}  blend test {_num(test['blend'])}  "
            f"(gain {test['gain']:+.4f})"
        )
    if spread := _spread(fit.get("judged_interval")):
        # the figure a user without test truth acts on: how much other places could move it
        lines.append(f"blend OOF {_num(oof)}{spread} (min {fit['judged_interval']['min_places']} per city)")
    if line := diversity_line(fit.get("diversity") or []):
        lines.append(line)
    return lines


def calibration(report: dict[str, Any]) -> dict[str, Any] | None:
    """What each earlier figure said, beside the test truth of unseen places (None without
    truth): the search's best validation score (single view, on the fold that chose the
    configs), the same with the trials' test-time views after their last epoch (`search_tta`),
    the best member config's out-of-fold score (the refit folds, with the ensemble's
    TTA) and the blend's cross-fitted OOF score, each with its gap to the delivered test score."""
    test = (report.get("test") or {}).get("blend")
    if test is None or not math.isfinite(test):
        return None
    rows = [c for c in report["configs"] if c.get("oof") is not None]
    best = max(rows, key=lambda c: c["oof"], default=None)
    searched = [c["search_score"] for c in report["configs"] if _finite(c.get("search_score"))]
    searched_tta = [c["search_score_tta"] for c in report["configs"] if _finite(c.get("search_score_tta"))]
    selection = {c.get("selection_fold", -1) for c in report["configs"]} - {-1}
    folds = sorted({f for c in report["configs"] for f in c.get("oof_folds", c["folds"])})
    optimistic = bool(selection & set(folds))
    figures = {
        "search": max(searched, default=None),
        "search_tta": max(searched_tta, default=None),
        "member_oof": best["oof"] if best else None,
        "blend_oof": report["oof"].get("judged", report["oof"].get("blend")),
    }
    member_spreads = report["oof"].get("member_intervals") or []
    best_i = report["configs"].index(best) if best else -1
    spreads = {
        "member_oof": member_spreads[best_i] if 0 <= best_i < len(member_spreads) else None,
        "blend_oof": report["oof"].get("judged_interval"),
    }
    test_spread = (report.get("test") or {}).get("blend_interval")
    return {
        "test": test,
        "test_interval": test_spread,
        "selection_folds": sorted(selection),
        "oof_folds": folds,
        "oof_optimistic": optimistic,
        "tta": report.get("tta"),
        **figures,
        "intervals": spreads,
        "search_epochs": max((c.get("search_epochs") or 0 for c in report["configs"]), default=0),
        "member_epochs": (best or {}).get("epochs") or 0,
        "gaps": {k: (v - test if _finite(v) else None) for k, v in figures.items()},
        # the sd of each gap from the places drawn alone (both sides' bootstraps); NaN: unknown
        "gap_noise": {k: gap_noise(spreads.get(k), test_spread) for k in figures},
    }


def calibration_lines(report: dict[str, Any]) -> list[str]:
    """The calibration table, each figure labelled for what it is."""
    cal = calibration(report)
    if cal is None:
        return []
    sel = ",".join(map(str, cal["selection_folds"])) or "?"
    oof = f"fold(s) {','.join(map(str, cal['oof_folds']))}, TTA {cal['tta']}"
    oof += ": includes the selection fold, optimistic" if cal["oof_optimistic"] else ": not the selection fold"
    budget = _budget(cal.get("search_epochs"), cal.get("member_epochs"))
    labels = {
        "search": f"search's best validation (fold {sel}, which chose the configs; single view, no TTA{budget})",
        "search_tta": f"the same configs' last epoch with the trials' TTA (fold {sel}; what is delivered{budget})",
        "member_oof": f"best member config's OOF ({oof})",
        "blend_oof": "blend's OOF (cross-fitted over tile groups)",
    }
    head = f"calibration against the test truth of unseen places ({_num(cal['test'])} delivered"
    lines = [head + _spread(cal.get("test_interval")) + "):"]
    for key, label in labels.items():
        if key == "search_tta" and cal[key] is None:
            continue  # no trial of these configs ran to its end with TTA (or an older search)
        gap, noise = cal["gaps"][key], (cal.get("gap_noise") or {}).get(key)
        noted = f" (places alone move it by +-{noise:.3f})" if _finite(noise) else ""
        shown = f"{_num(cal[key]):>8}{_spread((cal.get('intervals') or {}).get(key))}"
        lines.append(f"  {shown}  gap {'-' if gap is None else f'{gap:+.4f}'}{noted}  {label}")
    return lines


def _budget(search: int | None, members: int | None) -> str:
    """'; 20 epochs, the members 60': why a search's figure may trail what its refits deliver."""
    if not search:
        return ""
    return f"; {search} epochs" + (f", the members {members}" if members and members != search else "")


def _folds(config_row: dict[str, Any]) -> str:
    """'1,2' (the out-of-fold folds), with '+0' for a member on the search's fold: it predicts the
    test tiles only, since that fold's tiles chose the config."""
    oof = config_row.get("oof_folds", config_row["folds"])
    extra = [f for f in config_row["folds"] if f not in oof]
    return ",".join(map(str, oof)) + "".join(f" +{f}" for f in extra)


def _spread(spread: dict[str, Any] | None) -> str:
    """' +-sd [low, high] over P places', the bootstrap of a figure (`uncertainty.interval`)."""
    if not spread or not _finite(spread.get("sd")):
        return ""
    return f" +-{spread['sd']:.3f} [{spread['low']:.3f}, {spread['high']:.3f}] over {spread['places']} places"


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def _num(x: Any) -> str:
    """A score in a table cell: 4 decimals, scientific when huge (diverged), '-' when missing."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.3e}"


def config_rows(configs: list[tuple[str, dict[int, Member]]], fit: dict[str, Any]) -> list[dict[str, Any]]:
    oof = fit.get("members") or [None] * len(configs)
    rows = []
    for (cid, ms), score in zip(configs, oof):
        first = next(iter(ms.values()))
        rows.append(
            {
                "config_id": cid,
                "rank": first.rank,
                "folds": sorted(ms),
                "oof_folds": oof_folds(ms),  # the folds behind "oof" (not the search's own)
                "search_score": first.search_score,  # on the selection fold, single view
                "search_score_tta": first.search_score_tta,  # the same fold, test-time views, last epoch
                "selection_fold": first.selection_fold,
                "search_epochs": first.search_epochs,  # the budget behind the search's figures
                "epochs": int(first.config.get("epochs") or 0),  # the members' budget
                "val_score": first.score,  # the member's own fold, single view
                "oof": score,
            }
        )
    return rows
