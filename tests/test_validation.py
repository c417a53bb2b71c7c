"""`validation.validate`: the official score on full tiles, DDP shards summed, and test-time
views merged as the ensemble merges them. The fake model and tiles are test_train_loop's."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_loop import FakeModel, fake_criterion, fake_items, loader
from torch import nn

from geopose_ray.train_loop import validate


def test_validate_reports_score_and_sharded_sums_equal_the_whole():
    torch.manual_seed(1)
    model, items = FakeModel(), fake_items(8)
    dev = torch.device("cpu")
    whole = validate(model, loader(items, 1), fake_criterion, dev, "fp32")
    assert {"val_loss", "score", "score_ARG", "score_OMA", "agl_r2", "vflow_r2"} <= set(whole)
    assert all(math.isfinite(v) for v in whole.values())

    captured = {}

    def keep(a):
        captured["other"] = a.copy()
        return a

    validate(model, loader(items[1::2], 1), fake_criterion, dev, "fp32", reduce=keep)
    merged = validate(
        model, loader(items[0::2], 2), fake_criterion, dev, "fp32", reduce=lambda a: a + captured["other"]
    )
    assert merged == pytest.approx(whole, rel=1e-6)
    alone = validate(model, loader(items[0::2], 2), fake_criterion, dev, "fp32")
    assert alone != pytest.approx(whole, rel=1e-6)


def test_validate_with_views_scores_what_the_ensemble_predicts():
    """validate(views=D4) on a batch equals the official score of `predict_tile(tta="d4")` tile
    by tile: the trials' last figure and the ensemble share one TTA merge."""
    from geopose_ray.constants import CITIES
    from geopose_ray.metrics import GeoposeScore
    from geopose_ray.predict import predict_tile
    from geopose_ray.tta import views_for

    torch.manual_seed(2)
    model, items = FakeModel().eval(), fake_items(4)
    for it in items:  # images as uint8 tiles read them: k / 255 exactly
        it["image"] = torch.round(it["image"] * 255) / 255
    dev = torch.device("cpu")
    merged = validate(model, loader(items, 2), fake_criterion, dev, "fp32", views=views_for("d4"))
    expected = GeoposeScore()
    for it in items:
        rgb = (it["image"] * 255).round().byte().permute(1, 2, 0).numpy()  # (H, W, 3) uint8
        (p,) = predict_tile(model, rgb, float(it["gsd"]), int(it["city"]), tta="d4", precision="fp32")
        angle = math.atan2(float(it["direction"][0]), float(it["direction"][1]))
        expected.update(CITIES[int(it["city"])], it["agl"][0].numpy(), p.agl, 2.0, angle, p.scale, p.angle)
    assert merged["score"] == pytest.approx(expected.compute()["final_present"], abs=1e-5)
    single = validate(model, loader(items, 2), fake_criterion, dev, "fp32")
    assert merged["score"] != pytest.approx(single["score"], abs=1e-4) and math.isnan(merged["val_loss"])


def test_validate_scores_a_perfect_prediction_one():
    items = fake_items(4)

    class Oracle(nn.Module):  # returns the truth of the tiles in `items`, in order
        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, image, gsd, city):
            it = items[self.i]
            self.i += 1
            return {
                "agl": it["agl"].nan_to_num()[None],
                "mag": it["mag"].nan_to_num()[None],
                "scale": it["scale"].view(1, 1),
                "direction": it["direction"][None],
            }

    m = validate(Oracle(), loader(items, 1), fake_criterion, torch.device("cpu"), "fp32")
    assert m["score"] == pytest.approx(1.0, abs=1e-6) and m["val_loss"] == pytest.approx(0.0, abs=1e-9)
