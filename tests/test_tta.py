"""TTA de-augmentation and tiling of the predict core, checked with models whose outputs are
known to transform with the image (so any wrong view inverse or direction matrix shows up)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geopose_ray.predict import Prediction, blend_predictions, predict_tile, window_weight_1d
from geopose_ray.tta import D4_VIEWS, TTA_MODES, apply_view, invert_view


class CentroidModel(torch.nn.Module):
    """D4-equivariant by construction: AGL is a pointwise function of the image, the direction
    points from the tile centre to the intensity centroid (x = column, y = row down, so it turns
    with the tile), and scale is the mean intensity (invariant)."""

    divisor = 1

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, image, gsd, city):
        h, w = image.shape[-2:]
        i = image.mean(1)  # (B, H, W)
        rows = torch.arange(h, dtype=i.dtype) - (h - 1) / 2
        cols = torch.arange(w, dtype=i.dtype) - (w - 1) / 2
        dx = (i * cols).sum((1, 2))
        dy = (i * rows[:, None]).sum((1, 2))
        agl = self.gain * i[:, None] ** 2 + gsd[:, None, None, None]  # (B, 1, H, W) m
        return {
            "agl": agl,
            "mag": agl,
            "scale": i.mean((1, 2))[:, None],
            "direction": 3.7 * torch.stack([dx, dy], 1),  # deliberately not unit length
        }


class ConvModel(torch.nn.Module):
    """Fully convolutional (receptive-field radius 2, zero padding) with global-pool heads."""

    divisor = 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 3, padding=1)
        )

    def forward(self, image, gsd, city):
        agl = self.body(image)  # (B, 1, H, W)
        b = image.shape[0]
        return {
            "agl": agl,
            "mag": agl,
            "scale": torch.ones(b, 1),
            "direction": torch.tensor([[0.6, 0.8]] * b),
        }


def _tile(size: int = 48, width: int | None = None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((size, width or size, 3)) * 255).astype(np.uint8)


def _angle_diff(a: float, b: float) -> float:
    return abs(math.remainder(a - b, 2 * math.pi))


@pytest.mark.parametrize("view", D4_VIEWS, ids=lambda v: v.name)
def test_view_inverse_round_trips(view):
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert torch.equal(invert_view(apply_view(x, view), view), x)


@pytest.mark.parametrize("tta", ["flip", "d4"])
@pytest.mark.parametrize("width", [48, 40], ids=["square", "non-square"])
def test_tta_of_equivariant_model_equals_single_view(tta, width):
    model, tile = CentroidModel(), _tile(48, width)
    plain = predict_tile(model, tile, 0.5, "ATL", tta="none")[0]
    aug = predict_tile(model, tile, 0.5, "ATL", tta=tta)[0]
    np.testing.assert_allclose(aug.agl, plain.agl, atol=1e-5)
    assert _angle_diff(aug.angle, plain.angle) < 1e-5
    assert aug.scale == pytest.approx(plain.scale, abs=1e-5)


# Closed forms (docs/GEOPOSE.md, 'Geo-consistent augmentation') of what each view does to the angle.
SPATIAL = {
    "rot90_ccw": (lambda a: np.rot90(a, 1), lambda t: t + math.pi / 2),
    "rot180": (lambda a: np.rot90(a, 2), lambda t: t + math.pi),
    "hflip": (lambda a: a[:, ::-1], lambda t: -t),
    "vflip": (lambda a: a[::-1], lambda t: math.pi - t),
    "transpose": (lambda a: a.swapaxes(0, 1), lambda t: math.pi / 2 - t),
}


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_d4_tta_of_transformed_tile_gives_transformed_outputs(name):
    spatial, angle_map = SPATIAL[name]
    model, tile = CentroidModel(), _tile()
    ref = predict_tile(model, tile, 0.5, 1, tta="d4")[0]
    out = predict_tile(model, np.ascontiguousarray(spatial(tile)), 0.5, 1, tta="d4")[0]
    np.testing.assert_allclose(out.agl, spatial(ref.agl), atol=1e-5)
    assert _angle_diff(out.angle, angle_map(ref.angle)) < 1e-5


def test_centroid_model_reads_angle_in_official_convention():
    """A bright blob placed along (sin a, cos a) from the centre reads back as angle a, so the
    equivariance tests above pin the real convention, not just self-consistency."""
    tile = np.zeros((49, 49, 3), np.uint8)
    a = 2.5
    r, c = round(24 + 15 * math.cos(a)), round(24 + 15 * math.sin(a))
    tile[r - 1 : r + 2, c - 1 : c + 2] = 255
    pred = predict_tile(CentroidModel(), tile, 0.5, 0, tta="d4")[0]
    assert _angle_diff(pred.angle, math.atan2(c - 24, r - 24)) < 1e-5


@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_per_view_loop_matches_batched_views(tta):
    model, tile = ConvModel().eval(), _tile(32)
    batched = predict_tile(model, tile, 0.5, 2, tta=tta)[0]
    looped = predict_tile(model, tile, 0.5, 2, tta=tta, per_view_loop=True)[0]
    np.testing.assert_allclose(looped.agl, batched.agl, atol=1e-5)
    assert _angle_diff(looped.angle, batched.angle) < 1e-6


def test_tiling_with_overlap_matches_untiled_prediction():
    model, tile = ConvModel().eval(), _tile(100, 90, seed=3)
    full = predict_tile(model, tile, 0.5, 0, tta="flip")[0]
    tiled = predict_tile(model, tile, 0.5, 0, tta="flip", max_tile=40, overlap=16)[0]
    np.testing.assert_allclose(tiled.agl, full.agl, atol=1e-5)
    assert tiled.scale == pytest.approx(full.scale)
    assert _angle_diff(tiled.angle, full.angle) < 1e-6


def test_tiling_without_overlap_margin_shows_seams():
    """The control for the test above: windows that do not drop their rims are not exact."""
    model, tile = ConvModel().eval(), _tile(100, 90, seed=3)
    full = predict_tile(model, tile, 0.5, 0)[0]
    seamed = predict_tile(model, tile, 0.5, 0, max_tile=40, overlap=2)[0]
    assert np.abs(seamed.agl - full.agl).max() > 1e-3


def test_window_weights_partition_unity_in_the_overlap():
    overlap, length = 32, 64
    left = window_weight_1d(length, lead=False, trail=True, overlap=overlap)
    right = window_weight_1d(length, lead=True, trail=False, overlap=overlap)
    shared = left[length - overlap :] + right[:overlap]
    np.testing.assert_allclose(shared, 1.0, atol=1e-12)
    assert left[0] == 1.0 and right[-1] == 1.0 and left[-1] == 0.0


def test_weights_argument_returns_the_blend():
    tile = _tile(32)
    m1, m2 = CentroidModel(), ConvModel().eval()
    each = predict_tile([m1, m2], tile, 0.5, 0, tta="flip")
    blend = predict_tile([m1, m2], tile, 0.5, 0, tta="flip", weights=[0.25, 0.75])
    assert len(each) == 2 and len(blend) == 1
    np.testing.assert_allclose(blend[0].agl, 0.25 * each[0].agl + 0.75 * each[1].agl, atol=1e-5)


@pytest.mark.parametrize(
    ("angles_deg", "weights", "expected_deg"),
    [
        ((179, -179), (1, 1), 180),  # an arithmetic mean of the angles would say 0
        ((179, -179), (3, 1), 179.5),  # weights pull towards 179 (arithmetic: 89.5)
        ((150, -150, 180), (1, 1, 1), 180),
        ((-90, 90, 0), (0, 0, 1), 0),
    ],
)
def test_weighted_circular_mean_across_the_seam(angles_deg, weights, expected_deg):
    preds = [
        Prediction(
            np.zeros((2, 2), np.float32),
            1.0,
            np.array([math.sin(math.radians(a)), math.cos(math.radians(a))]),
        )
        for a in angles_deg
    ]
    out = blend_predictions(preds, weights)
    assert _angle_diff(out.angle, math.radians(expected_deg)) < math.radians(0.01)
    assert np.linalg.norm(out.direction) == pytest.approx(1.0)


def test_unknown_tta_and_bad_image_are_rejected():
    with pytest.raises(ValueError, match="d4"):
        predict_tile(CentroidModel(), _tile(8), 0.5, 0, tta="d8")
    with pytest.raises(ValueError, match="shape"):
        predict_tile(CentroidModel(), np.zeros((8, 8), np.uint8), 0.5, 0)
    assert set(TTA_MODES) == {"none", "flip", "d4"}


@pytest.mark.slow
def test_smp_unet_d4_batched_matches_per_view_loop():
    """Real architecture: a Unet-resnet18 (BatchNorm in eval mode) gives the same D4 result
    batched as one forward of 8 views or looped view by view."""
    smp = pytest.importorskip("segmentation_models_pytorch")

    class Wrapped(torch.nn.Module):
        divisor = 32

        def __init__(self):
            super().__init__()
            self.net = smp.Unet("resnet18", encoder_weights=None, classes=3)

        def forward(self, image, gsd, city):
            out = self.net(image)  # (B, 3, H, W)
            return {
                "agl": out[:, :1],
                "mag": out[:, :1],
                "scale": out[:, 1].mean((1, 2))[:, None],
                "direction": out[:, 1:].mean((2, 3)),
            }

    model, tile = Wrapped().eval(), _tile(80)  # not a multiple of 32: exercises the padding
    batched = predict_tile(model, tile, 0.5, 0, tta="d4")[0]
    looped = predict_tile(model, tile, 0.5, 0, tta="d4", per_view_loop=True)[0]
    assert batched.agl.shape == (80, 80) and np.isfinite(batched.agl).all()
    np.testing.assert_allclose(looped.agl, batched.agl, atol=1e-4)
    assert looped.scale == pytest.approx(batched.scale, abs=1e-4)


def test_the_constants_name_every_tta_mode_with_its_number_of_views():
    from geopose_ray.constants import TTA_VIEWS

    assert {name: len(views) for name, views in TTA_MODES.items()} == TTA_VIEWS
