"""The members' error correlation: recovered from the blend's own grid scores, it says how much
any two-member blend can gain."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geopose_ray.constants import CITIES
from geopose_ray.ensemble.blend import OofTable, tile_stats
from geopose_ray.ensemble.diversity import diversity_line, error_diversity
from geopose_ray.predict import Prediction


def _table(rho: float, k: int = 2, n: int = 16, size: int = 24, seed: int = 0) -> tuple[OofTable, list]:
    """OOF tiles whose K members err with AGL noise of equal size and pairwise correlation rho
    (a shared part plus an own part), exact scale and direction; returns the table and the
    members' AGL errors, flattened over valid pixels, (K, P) m."""
    rng = np.random.default_rng(seed)
    records, errors = [], []
    for i in range(n):
        y = 10.0 + rng.gamma(2.0, 3.0, (size, size))  # tall enough that no member goes below 0
        shared = rng.normal(0, 1.0, y.shape)
        own = [rng.normal(0, 1.0, y.shape) for _ in range(k)]
        e = [math.sqrt(rho) * shared + math.sqrt(1 - rho) * o for o in own]
        st, at = rng.uniform(0.6, 1.1), rng.uniform(-math.pi, math.pi)
        preds = [Prediction((y + ek).astype(np.float32), st, np.array([math.sin(at), math.cos(at)])) for ek in e]
        errors.append(np.stack([(p.agl - y).ravel() for p in preds]))
        record = tile_stats(preds, y, st, at)
        records.append({**record, "id": f"t{i:02d}", "city": CITIES[i % 4], "fold": 0, "gsd": 0.5})
    return OofTable.from_records(records), np.concatenate(errors, axis=1)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, 0.97])
def test_agl_correlation_is_that_of_the_members_errors(rho):
    table, errors = _table(rho)
    (pair,) = error_diversity(table)
    measured = float(np.corrcoef(errors)[0, 1])  # of the float32 maps as written
    assert pair["agl_corr"] == pytest.approx(measured, abs=1e-3)
    assert pair["agl_corr"] == pytest.approx(rho, abs=0.05)
    # two equally good members: the even mix removes (1 - rho) / 2 of the error, nothing more
    assert pair["agl_cut"] == pytest.approx((1 - measured) / 2, abs=0.02)
    # exact scale and direction: the vflow error is the AGL error times the tile's scale, so
    # the same correlation with tiles weighted by scale²
    assert pair["vflow_corr"] == pytest.approx(pair["agl_corr"], abs=0.03)


def test_every_pair_is_reported_and_the_line_gives_their_range():
    table, errors = _table(0.6, k=3)
    pairs = error_diversity(table)
    assert [p["members"] for p in pairs] == [[0, 1], [0, 2], [1, 2]]
    corr = np.corrcoef(errors)
    for p in pairs:
        assert p["agl_corr"] == pytest.approx(corr[tuple(p["members"])], abs=2e-3)
    line = diversity_line(pairs)
    assert line.startswith("members' OOF error correlation: AGL 0.") and "-" in line.split("AGL ")[1].split(",")[0]


def test_one_member_has_no_pairs_and_no_line():
    table, _ = _table(0.5, k=1)
    assert error_diversity(table) == []
    assert diversity_line([]) is None


def test_identical_members_gain_nothing():
    table, _ = _table(1.0)
    (pair,) = error_diversity(table)
    assert pair["agl_corr"] == pytest.approx(1.0, abs=1e-6) and pair["agl_cut"] == pytest.approx(0.0, abs=1e-6)


def test_sses_no_linear_blend_can_give_report_no_correlation_and_the_measured_cut():
    """The vflow blend mixes scale and unit direction apart, so its three SSEs can imply
    |e_a - e_b|^2 <= 0; that was reported as a correlation of 1.000 between members whose
    scores differed by 0.45."""
    from geopose_ray.ensemble.diversity import _pair_stats, diversity_line

    stats = _pair_stats(s_a=1.0, s_b=4.0, s_w=2.4, w=0.5)  # implies <e_a, e_b> 2.3 > sqrt(1 x 4)
    assert np.isnan(stats["corr"]) and stats["cut"] == 0.0
    assert _pair_stats(s_a=1.0, s_b=4.0, s_w=0.6, w=0.5)["corr"] == pytest.approx(-0.65)  # a linear one
    line = diversity_line([{"agl_corr": 0.5, "agl_cut": 0.1, "vflow_corr": stats["corr"], "vflow_cut": 0.0}])
    assert "vflow n/a (not a linear blend)" in line and "1.000" not in line
    as_json = [{"agl_corr": 0.5, "agl_cut": 0.1, "vflow_corr": None, "vflow_cut": 0.0}]  # after json_safe
    assert "vflow n/a" in diversity_line(as_json)
