"""The dense direction head: the tile's angle is the MAG-weighted circular mean of a flow field."""

from __future__ import annotations

import math

import pytest
import torch

from geopose_ray.config import LossConfig, ModelConfig
from geopose_ray.losses import build_criterion
from geopose_ray.models import build_model
from geopose_ray.models.build import DIRECTION_HEADS
from geopose_ray.models.heads import pooled_direction


def _field(angle: float, mag: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) flow mag * (sin a, cos a)."""
    return torch.cat([mag * math.sin(angle), mag * math.cos(angle)], dim=1)


@pytest.mark.parametrize("angle", [0.0, 1.0, math.pi, -2.5])
def test_pooled_direction_of_a_coherent_field_is_its_unit_angle(angle: float):
    mag = torch.rand(1, 1, 16, 16) * 5
    d = pooled_direction(_field(angle, mag), mag)
    assert torch.allclose(d.norm(dim=1), torch.ones(1), atol=1e-4)
    assert math.atan2(float(d[0, 0]), float(d[0, 1])) == pytest.approx(
        math.atan2(math.sin(angle), math.cos(angle)), abs=1e-4
    )


def test_pooled_direction_weights_votes_by_mag_not_by_flow_length():
    """Tall buildings (large MAG) outvote flat ground even where the flow itself is short."""
    mag = torch.zeros(1, 1, 4, 4)
    mag[..., :2] = 10.0  # buildings on the left half
    flow = _field(0.0, torch.full((1, 1, 4, 4), 1e-2))  # short flow pointing down (angle 0) ...
    flow[..., 2:] = _field(math.pi / 2, torch.full((1, 1, 4, 2), 50.0))  # ... long flow right on flat ground
    d = pooled_direction(flow, mag)
    assert math.atan2(float(d[0, 0]), float(d[0, 1])) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("head", DIRECTION_HEADS)
def test_every_direction_head_trains_through_the_criterion(head: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18", direction_head=head))
    out = model(torch.rand(2, 3, 64, 64), torch.full((2,), 0.4))
    assert out["direction"].shape == (2, 2) and out["mag"].shape == (2, 1, 64, 64)
    assert ("flow" in out) == (head == "dense")
    mag = torch.rand(2, 1, 64, 64) * 4
    mag[0, 0, 0, 0] = float("nan")  # no lidar: ignored by the flow loss too
    batch = {
        "agl": mag / 0.8, "mag": mag, "scale": torch.full((2,), 0.8),
        "direction": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "city": torch.tensor([0, 1]),
    }  # fmt: skip
    loss, _ = build_criterion(LossConfig())(out, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith(("flow_head", "direction_head"))]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_direction_head_is_refused():
    with pytest.raises(ValueError, match="direction_head"):
        build_model(ModelConfig(encoder="resnet18", direction_head="sideways"))


def test_output_units_scale_the_dense_heads_and_travel_with_the_weights():
    """Heads output in the data's units (target RMS), and the units are part of the state dict,
    so a checkpoint predicts at the scale it was trained at; older checkpoints load with units 1."""
    from geopose_ray.checkpoint import load_weights

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", direction_head="dense")
    model = build_model(cfg).eval()
    x, gsd = torch.rand(1, 3, 64, 64), torch.full((1,), 0.4)
    with torch.no_grad():
        base = model(x, gsd)
        model.set_target_units(50.0, 4.0)
        scaled = model(x, gsd)
    assert torch.allclose(scaled["agl"], base["agl"] * 50.0, rtol=1e-5, atol=1e-6)
    assert torch.allclose(scaled["flow"], base["flow"] * 4.0, rtol=1e-5, atol=1e-6)
    fresh = build_model(cfg)
    load_weights(fresh, model.state_dict())
    assert float(fresh.agl_unit) == 50.0 and float(fresh.mag_unit) == 4.0
    old = {k: v for k, v in model.state_dict().items() if k not in ("agl_unit", "mag_unit")}
    load_weights(fresh, old)
    assert float(fresh.agl_unit) == 1.0
