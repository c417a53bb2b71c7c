"""The streaming score against hand-computed numbers and a plain two-pass reimplementation of the
official procedure (docs/GEOPOSE.md, 'The metric'), merging, failure rules and the predicted-NaN quirk."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geopose_ray.constants import CITIES
from geopose_ray.metrics import FIELDS, GeoposeScore


# --- the official procedure, written out as docs/GEOPOSE.md, 'The metric' lists it (two passes) ---
def _vflow_field(agl: np.ndarray, scale: float, angle: float) -> np.ndarray:
    """(H, W, 2) px: mag * (sin a, cos a), as the baseline's load_vflow builds it."""
    mag = agl * scale
    out = np.zeros((*agl.shape, 2))
    out[..., 0] = mag * np.sin(angle)
    out[..., 1] = mag * np.cos(angle)
    return out


def official_two_pass(images: dict[str, list[tuple | None]]) -> dict[str, float]:
    """City -> score from lists of (agl_true, agl_pred, st, at, sp, ap); None = a failed image."""
    scores = {}
    for city in CITIES:
        items = images.get(city, [])
        if not items:
            scores[city] = math.nan
            continue
        if any(it is None or not (np.isfinite(it[4]) and np.isfinite(it[5])) for it in items):
            scores[city] = 0.0
            continue
        agl_count = agl_sse = agl_sum = vf_count = vf_sse = vf_sum = 0.0
        for gt, pred, st, at, sp, ap in items:  # pass 1
            vgt, vpred = _vflow_field(gt, st, at), _vflow_field(pred, sp, ap)
            agl_count += np.sum(np.isfinite(gt))
            agl_sse += np.nansum(np.square(pred - gt))
            agl_sum += np.nansum(gt)
            vf_count += np.sum(np.isfinite(vgt))
            vf_sse += np.nansum(np.square(vpred - vgt))
            vf_sum += np.nansum(vgt)
        agl_mean = agl_sum / (agl_count + 0.0001)
        vf_mean = vf_sum / (vf_count + 0.0001)
        agl_denom = vf_denom = 0.0
        for gt, _, st, at, _, _ in items:  # pass 2
            agl_denom += np.nansum(np.square(gt - agl_mean))
            vf_denom += np.nansum(np.square(_vflow_field(gt, st, at) - vf_mean))
        agl_r2 = 1.0 - agl_sse / (agl_denom + 0.0001)
        vf_r2 = 1.0 - vf_sse / (vf_denom + 0.0001)
        scores[city] = (vf_r2 + agl_r2) / 2.0
    scores["final"] = sum(scores[c] for c in CITIES) / 4.0
    return scores


def _random_image(rng: np.random.Generator, shape=(12, 10), nan_frac=0.15, noise=2.0):
    gt = rng.gamma(1.5, 4.0, size=shape)  # m, skewed like real heights
    gt[rng.random(shape) < nan_frac] = np.nan
    pred = np.nan_to_num(gt, nan=3.0) * rng.uniform(0.8, 1.2) + rng.normal(0, noise, shape)
    pred[rng.random(shape) < 0.05] = np.nan  # predicted 65535 -> NaN (quirk)
    st, sp = rng.uniform(0.6, 1.1), rng.uniform(0.6, 1.1)  # px/m
    at = rng.uniform(-math.pi, math.pi)
    ap = at + rng.normal(0, 0.3)
    return gt, pred, st, at, sp, ap


def _random_set(seed: int, per_city=(3, 1, 2, 4)) -> dict[str, list[tuple]]:
    rng = np.random.default_rng(seed)
    return {
        c: [_random_image(rng, shape=tuple(rng.integers(4, 16, 2))) for _ in range(k)]
        for c, k in zip(CITIES, per_city)
    }


def _streamed(images: dict[str, list[tuple | None]]) -> GeoposeScore:
    score = GeoposeScore()
    for city, items in images.items():
        for it in items:
            if it is None:
                score.mark_failed(city)
            else:
                score.update(city, *it)
    return score


# --- hand-computed case ------------------------------------------------------------------
def test_hand_computed_2x2():
    # ARG, one 2x2 image: truth AGL [[1, 2], [3, NaN]] m, prediction [[1, 2], [4, 9]] m,
    # truth and predicted scale 2 px/m, angle 0 (flow points down: x = 0, y = 2 * agl).
    # AGL: n = 3, S = 6, mean m = 6 / 3.0001; sse = (4 - 3)^2 = 1 (the 9 sits on a NaN truth).
    #   denom = sum((y - m)^2) = sum((y - 2)^2) + 3 (2 - m)^2 = 2 + 3 (2 - m)^2 (~2 + 1.3e-8)
    #   R2_agl = 1 - 1 / (denom + 1e-4) ~= 0.500025
    # VFLOW: values x (0, 0, 0), y (2, 4, 6): n = 6, S = 12, sumsq = 56, ONE pooled mean
    #   mv = 12 / 6.0001 ~= 2; denom = 56 - 2 mv 12 + 6 mv^2 (~= 56 - 48 + 24 = 32)
    #   sse = (8 - 6)^2 = 4; R2_vflow = 1 - 4 / (denom + 1e-4) ~= 0.875
    #   (per-component means would give denom 8 and R2 0.5: the pooled mean matters)
    # JAX, one 1x2 image predicted perfectly -> 1.0. ATL and OMA: no data -> NaN.
    score = GeoposeScore()
    score.update(
        "ARG", np.array([[1.0, 2.0], [3.0, np.nan]]), np.array([[1.0, 2.0], [4.0, 9.0]]), 2.0, 0.0, 2.0, 0.0
    )
    score.update("JAX", np.array([[5.0, 1.0]]), np.array([[5.0, 1.0]]), 0.8, 1.0, 0.8, 1.0)
    res = score.compute()

    m = 6 / 3.0001
    agl_r2 = 1 - 1 / (2 + 3 * (2 - m) ** 2 + 1e-4)
    mv = 12 / 6.0001
    vflow_r2 = 1 - 4 / (56 - 2 * mv * 12 + 6 * mv**2 + 1e-4)
    assert agl_r2 == pytest.approx(0.500025, abs=1e-6) and vflow_r2 == pytest.approx(0.875, abs=1e-4)
    assert res["agl_r2"]["ARG"] == pytest.approx(agl_r2, rel=1e-12)
    assert res["vflow_r2"]["ARG"] == pytest.approx(vflow_r2, rel=1e-12)
    assert res["cities"]["ARG"] == pytest.approx((agl_r2 + vflow_r2) / 2, rel=1e-12)
    assert res["cities"]["JAX"] == 1.0
    assert math.isnan(res["cities"]["ATL"]) and math.isnan(res["cities"]["OMA"])
    assert math.isnan(res["final"])  # official: a city without truth makes the final NaN
    assert res["final_present"] == pytest.approx(((agl_r2 + vflow_r2) / 2 + 1.0) / 2, rel=1e-12)
    assert res["counts"]["ARG"] == {"images": 1, "failed": 0, "pixels": 3}


# --- against the two-pass reference ------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_two_pass(seed):
    images = _random_set(seed)
    ref = official_two_pass(images)
    res = _streamed(images).compute()
    for c in CITIES:
        assert res["cities"][c] == pytest.approx(ref[c], rel=1e-9), c
    assert res["final"] == pytest.approx(ref["final"], rel=1e-9)
    assert 0.0 < res["final"] < 1.0  # non-trivial data, not a degenerate case


def test_no_clipping_at_zero():
    # a prediction worse than the mean gives a negative R², as the official code (no max(0, .))
    rng = np.random.default_rng(5)
    gt = rng.uniform(0, 10, (8, 8))
    images = {"OMA": [(gt, gt[::-1, ::-1] * 3, 1.0, 0.5, 1.0, 2.5)]}
    res = _streamed(images).compute()
    assert res["cities"]["OMA"] < 0
    assert res["cities"]["OMA"] == pytest.approx(official_two_pass(images)["OMA"], rel=1e-9)


# --- merging -----------------------------------------------------------------------------
def test_split_accumulators_sum_to_one_pass():
    images = _random_set(3)
    whole = _streamed(images)
    flat = [(c, it) for c, items in images.items() for it in items]
    shards = [GeoposeScore() for _ in range(3)]
    for i, (c, it) in enumerate(flat):
        shards[i % 3].update(c, *it)
    by_add = shards[0] + shards[1] + shards[2]
    by_sum = sum(shards)
    by_merge = GeoposeScore().merge(shards[2]).merge(shards[0]).merge(shards[1])
    reduced = GeoposeScore.from_array(np.sum([s.to_array() for s in shards], axis=0))  # all_reduce(SUM)
    for other in (by_add, by_sum, by_merge, reduced):
        np.testing.assert_allclose(other.to_array(), whole.to_array(), rtol=1e-12)
        assert other.compute()["final"] == pytest.approx(whole.compute()["final"], rel=1e-12)


def test_image_split_into_crops_equals_whole_image():
    gt, pred, st, at, sp, ap = _random_image(np.random.default_rng(7), shape=(16, 16))
    whole, crops = GeoposeScore(), GeoposeScore()
    whole.update("ATL", gt, pred, st, at, sp, ap)
    for rows in (slice(0, 8), slice(8, 16)):
        for cols in (slice(0, 5), slice(5, 16)):
            crops.update("ATL", gt[rows, cols], pred[rows, cols], st, at, sp, ap)
    a, b = whole.compute(), crops.compute()
    assert b["cities"]["ATL"] == pytest.approx(a["cities"]["ATL"], rel=1e-12)
    assert crops.compute()["counts"]["ATL"]["images"] == 4  # images differ, pixels pooled


def test_array_round_trip_shape_and_dtype():
    score = _streamed(_random_set(4))
    arr = score.to_array()
    assert arr.shape == (len(CITIES), len(FIELDS)) and arr.dtype == np.float64
    arr[0, 0] += 1  # a copy: the score must not change
    assert GeoposeScore.from_array(score.to_array()).compute() == score.compute()
    assert score.to_array()[0, 0] == arr[0, 0] - 1


# --- special cases and rules -------------------------------------------------------------
def test_perfect_prediction_scores_one():
    images = _random_set(6)
    perfect = {
        c: [(gt, gt.copy(), st, at, st, at) for gt, _, st, at, _, _ in items] for c, items in images.items()
    }
    res = _streamed(perfect).compute()
    assert res["final"] == 1.0
    assert all(v == 1.0 for v in res["cities"].values())


@pytest.mark.parametrize(
    "spoil",
    ["agl_none", "scale_nan", "angle_nan", "scale_none", "mark_failed"],
)
def test_one_failed_image_zeroes_its_city_only(spoil):
    images = _random_set(8)
    score = _streamed(images)
    before = score.compute()
    gt, pred, st, at, sp, ap = images["JAX"][0]
    if spoil == "mark_failed":
        score.mark_failed("JAX")
    else:
        args = {
            "agl_none": (gt, None, st, at, sp, ap),
            "scale_nan": (gt, pred, st, at, math.nan, ap),
            "angle_nan": (gt, pred, st, at, sp, math.nan),
            "scale_none": (gt, pred, st, at, None, ap),
        }[spoil]
        assert score.update("JAX", *args) is False
    res = score.compute()
    assert res["cities"]["JAX"] == 0.0
    assert math.isnan(res["agl_r2"]["JAX"])
    assert res["counts"]["JAX"]["failed"] == 1
    for c in ("ARG", "ATL", "OMA"):
        assert res["cities"][c] == before["cities"][c]
    assert res["final"] == pytest.approx(sum(res["cities"].values()) / 4)


def test_failure_survives_merging():
    ok, bad = _streamed(_random_set(9)), GeoposeScore()
    bad.mark_failed("ARG")
    assert (ok + bad).compute()["cities"]["ARG"] == 0.0
    assert ok.compute()["cities"]["ARG"] != 0.0


def test_predicted_nan_drops_out_of_sse_but_not_denominator():
    # official quirk: a predicted 65535 becomes NaN; nansum drops that pixel from the SSE only
    rng = np.random.default_rng(10)
    gt = rng.uniform(0, 20, (6, 6))
    pred = gt + rng.normal(0, 1, gt.shape)
    bad = pred.copy()
    bad[2, 3] = 500.0  # a huge error ...
    quirk = pred.copy()
    quirk[2, 3] = np.nan  # ... hidden by NaN
    fixed = pred.copy()
    fixed[2, 3] = gt[2, 3]  # what the quirk is equivalent to
    scores = {}
    for name, p in (("bad", bad), ("quirk", quirk), ("fixed", fixed)):
        s = GeoposeScore()
        s.update("OMA", gt, p, 1.0, 0.3, 1.0, 0.3)
        scores[name] = s.compute()["cities"]["OMA"]
    assert scores["quirk"] == pytest.approx(scores["fixed"], rel=1e-12)
    assert scores["bad"] < scores["quirk"]
    # whereas a NaN in the TRUTH removes the pixel from the denominator too
    gt_nan = gt.copy()
    gt_nan[2, 3] = np.nan
    s = GeoposeScore()
    s.update("OMA", gt_nan, pred, 1.0, 0.3, 1.0, 0.3)
    assert s.compute()["counts"]["OMA"]["pixels"] == gt.size - 1
    assert s.compute()["cities"]["OMA"] == pytest.approx(
        official_two_pass({"OMA": [(gt_nan, pred, 1.0, 0.3, 1.0, 0.3)]})["OMA"], rel=1e-9
    )


def test_nan_pred_fails_option_for_raw_model_output():
    gt = np.ones((4, 4))
    pred = gt.copy()
    pred[0, 0] = np.nan
    s = GeoposeScore()
    assert s.update("ARG", gt, pred, 1.0, 0.0, 1.0, 0.0, nan_pred_fails=True) is False
    assert s.compute()["cities"]["ARG"] == 0.0


def test_bad_calls_raise():
    s = GeoposeScore()
    with pytest.raises(ValueError, match="unknown city"):
        s.update("XYZ", np.ones((2, 2)), np.ones((2, 2)), 1.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        s.update("ARG", np.ones((2, 2)), np.ones((2, 3)), 1.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="truth"):
        s.update("ARG", np.ones((2, 2)), np.ones((2, 2)), math.nan, 0.0, 1.0, 0.0)


def test_empty_score_is_nan():
    res = GeoposeScore().compute()
    assert math.isnan(res["final"]) and math.isnan(res["final_present"])
