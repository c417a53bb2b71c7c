"""The ensemble's calibration lines: every figure that steered the run, labelled for what it is,
beside the test score of unseen places, with its gap."""

from __future__ import annotations

import pytest

from geopose_ray.ensemble.report import calibration, calibration_lines


def _report(folds: list[int], selection: int = 0, test: float | None = 0.55) -> dict:
    config = {"config_id": "A", "folds": folds, "selection_fold": selection, "search_score": 0.71, "oof": 0.6}
    return {
        "configs": [config, {**config, "config_id": "B", "search_score": 0.65, "oof": 0.52}],
        "tta": "flip",
        "oof": {"judged": 0.58, "blend": 0.6},
        "test": None if test is None else {"blend": test},
    }


def test_each_figure_is_set_beside_the_delivered_score_with_its_gap():
    cal = calibration(_report([1]))
    assert cal["search"] == 0.71 and cal["member_oof"] == 0.6 and cal["blend_oof"] == 0.58
    gaps = {k: v for k, v in cal["gaps"].items() if v is not None}
    assert gaps == pytest.approx({"search": 0.16, "member_oof": 0.05, "blend_oof": 0.03})
    assert cal["search_tta"] is None  # no trial ran to its end with TTA: no line for it
    assert not cal["oof_optimistic"]
    lines = calibration_lines(_report([1]))
    assert "0.5500 delivered" in lines[0]
    assert any("which chose the configs; single view" in line and "+0.1600" in line for line in lines)
    assert any("fold(s) 1, TTA flip: not the selection fold" in line for line in lines)


def test_each_spread_over_places_is_printed_with_the_noise_of_its_gap():
    report = _report([1])
    spread = {"sd": 0.03, "low": 0.5, "high": 0.6, "places": 9, "min_places": 2, "tiles": 9}
    report["oof"].update(member_intervals=[spread, spread], judged_interval=spread)
    report["test"]["blend_interval"] = {**spread, "sd": 0.04, "places": 32}
    cal = calibration(report)
    assert (
        cal["gap_noise"]["blend_oof"] == pytest.approx(0.05)
        and cal["gap_noise"]["search"] != cal["gap_noise"]["search"]
    )
    lines = calibration_lines(report)
    assert "+-0.040 [0.500, 0.600] over 32 places" in lines[0]
    assert any("0.5800 +-0.030" in line and "places alone move it by +-0.050" in line for line in lines)


def test_the_search_figure_through_the_products_views_gets_its_own_line():
    report = _report([1])
    report["configs"][0]["search_score_tta"] = 0.57
    cal = calibration(report)
    assert cal["search_tta"] == 0.57 and cal["gaps"]["search_tta"] == pytest.approx(0.02)
    assert any("0.5700" in line and "what is delivered" in line for line in calibration_lines(report))
    assert not any("what is delivered" in line for line in calibration_lines(_report([1])))


def test_out_of_fold_scores_on_the_selection_fold_are_labelled_optimistic():
    assert calibration(_report([0, 1]))["oof_optimistic"]
    assert any("includes the selection fold, optimistic" in line for line in calibration_lines(_report([0])))


def test_without_test_truth_there_is_nothing_to_calibrate_against():
    assert calibration(_report([1], test=None)) is None and calibration_lines(_report([1], test=None)) == []


def test_the_search_figures_name_their_budget_when_the_members_train_longer():
    """A search's trial ranks configs at its own budget; the refits the test score comes from may
    train longer (--refit-epochs), which the search's lines must say."""
    report = _report([1])
    for c in report["configs"]:
        c.update(search_epochs=20, epochs=60)
    report["configs"][0]["search_score_tta"] = 0.57
    lines = [line for line in calibration_lines(report) if "fold 0" in line]
    assert len(lines) == 2 and all("; 20 epochs, the members 60)" in line for line in lines)
    for c in report["configs"]:
        c["epochs"] = 20  # the same budget: only the search's
    assert all(line.endswith("; 20 epochs)") for line in calibration_lines(report) if "fold 0" in line)
    assert not any("epochs" in line for line in calibration_lines(_report([1])))  # an older search: unknown
