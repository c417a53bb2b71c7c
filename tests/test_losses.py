"""Losses: every registered dense loss is minimal at a perfect prediction, NaN-masked, AMP-safe;
r2_city follows the 1st-place formula with fixed city means; the criterion weights its parts."""

from __future__ import annotations

import pytest
import torch

from geopose_ray.config import LossConfig
from geopose_ray.constants import CITIES
from geopose_ray.losses import (
    DENSE_LOSSES,
    build_criterion,
    build_dense_loss,
    direction_loss,
    r2_per_city,
)

PARAMS = {"delta": 5.0, "beta": 0.2}


def _target(b: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g) * 20  # (B, 1, H, W) metres


def _city(b: int = 2) -> torch.Tensor:
    return torch.arange(b) % len(CITIES)


@pytest.mark.parametrize("name", sorted(DENSE_LOSSES))
def test_dense_loss_minimal_at_perfect_prediction(name):
    loss = build_dense_loss(name, **PARAMS)
    t = _target()
    perfect = loss(t.clone(), t, _city())
    worse = loss(t + torch.randn_like(t), t, _city())
    assert torch.isfinite(perfect) and torch.isfinite(worse)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    assert worse.item() > perfect.item() + 1e-3


@pytest.mark.parametrize("name", sorted(DENSE_LOSSES))
def test_dense_loss_ignores_nan_targets(name):
    loss = build_dense_loss(name, **PARAMS)
    t = _target()
    t[:, :, :4] = float("nan")
    p = (t.nan_to_num(0) + 1.5).requires_grad_()
    wild = p.detach().clone()
    wild[:, :, :4] = 1e6  # garbage where there is no label
    a = loss(p, t, _city())
    b = loss(wild, t, _city())
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-6)
    a.backward()
    assert torch.isfinite(p.grad).all()
    assert (p.grad[:, :, :4] == 0).all() and (p.grad[:, :, 4:] != 0).any()


@pytest.mark.parametrize("name", sorted(DENSE_LOSSES))
def test_all_nan_batch_gives_zero_loss_with_graph(name):
    loss = build_dense_loss(name, **PARAMS)
    p = torch.randn(2, 1, 8, 8, requires_grad=True)
    value = loss(p, torch.full((2, 1, 8, 8), float("nan")), _city())
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.isfinite(p.grad).all() and (p.grad == 0).all()


def test_unknown_loss_name_lists_valid_ones():
    with pytest.raises(ValueError, match="focal_mse"):
        build_criterion(LossConfig(agl_loss="l3"))
    with pytest.raises(ValueError, match="r2_city"):
        build_criterion(LossConfig(mag_loss="nope"))


def _r2(p: torch.Tensor, t: torch.Tensor, mean: float) -> float:
    return (((t - p) ** 2).sum().item() + 1e-8) / (((t - mean) ** 2).sum().item() + 1e-8)


def test_r2_city_uses_given_fixed_means_and_averages_cities():
    t, p = _target(4), _target(4, seed=1)
    city = torch.tensor([0, 0, 2, 2])  # ARG, ARG, JAX, JAX
    means = torch.tensor([3.0, 8.0, 5.0, 2.0])
    expected = 0.5 * (_r2(p[:2], t[:2], 3.0) + _r2(p[2:], t[2:], 5.0))
    assert r2_per_city(p, t, city, means).item() == pytest.approx(expected, rel=1e-5)
    other = r2_per_city(p, t, city, torch.tensor([9.0, 8.0, 1.0, 2.0]))
    assert other.item() != pytest.approx(expected, rel=1e-3)


def test_r2_city_falls_back_to_batch_mean():
    t, p = _target(2), _target(2, seed=1)
    city = torch.zeros(2, dtype=torch.long)
    expected = _r2(p, t, t.mean().item())
    assert r2_per_city(p, t, city, None).item() == pytest.approx(expected, rel=1e-5)


def test_criterion_passes_city_means_per_target():
    """AGL gets the first mean of each city, MAG the second."""
    t, p = _target(2), _target(2, seed=1)
    batch = {
        "agl": t,
        "mag": t,
        "scale": torch.ones(2),
        "direction": torch.tensor([[0.0, 1.0]] * 2),
        "city": torch.tensor([1, 1]),
    }
    pred = {"agl": p, "mag": p, "scale": torch.ones(2, 1), "direction": batch["direction"].clone()}
    crit = build_criterion(LossConfig(agl_loss="r2_city", mag_loss="r2_city"), {"ATL": (8.0, 5.0)})
    _, parts = crit(pred, batch)
    assert parts["agl"].item() == pytest.approx(_r2(p, t, 8.0), rel=1e-5)
    assert parts["mag"].item() == pytest.approx(_r2(p, t, 5.0), rel=1e-5)
    with pytest.raises(ValueError, match="XYZ"):
        build_criterion(LossConfig(agl_loss="r2_city"), {"XYZ": (1.0, 1.0)})


def test_direction_loss_zero_when_aligned_and_penalises_norm():
    a = torch.rand(5) * 6.28
    target = torch.stack([a.sin(), a.cos()], dim=1)  # (B, 2) unit
    assert direction_loss(target.clone(), target, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    # same direction, twice the length: the cosine term is 0, the raw-vector MSE is not
    assert direction_loss(2 * target, target, 1.0).item() == pytest.approx(0.5, rel=1e-5)
    assert direction_loss(2 * target, target, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert direction_loss(-target, target, 0.0).item() == pytest.approx(2.0, rel=1e-5)


def _batch_and_perfect_pred(b: int = 3, size: int = 16):
    agl = _target(b, size)
    scale = torch.rand(b) + 0.5  # px/m
    mag = agl * scale.view(-1, 1, 1, 1)
    a = torch.rand(b) * 6.28
    batch = {
        "agl": agl,
        "mag": mag,
        "scale": scale,
        "direction": torch.stack([a.sin(), a.cos()], 1),
        "city": _city(b),
    }
    pred = {
        "agl": agl.clone(),
        "mag": mag.clone(),
        "scale": scale.view(-1, 1).clone(),
        "direction": batch["direction"].clone(),
    }
    batch["agl"][0, 0, :3] = float("nan")
    batch["mag"][0, 0, :3] = float("nan")
    return batch, pred


@pytest.mark.parametrize("name", sorted(DENSE_LOSSES))
def test_criterion_total_is_weighted_sum_and_minimal_at_perfect(name):
    cfg = LossConfig(
        agl_loss=name,
        mag_loss=name,
        agl_weight=1.5,
        mag_weight=0.5,
        dir_weight=3.0,
        scale_weight=7.0,
        dir_mse_lambda=0.3,
    )
    crit = build_criterion(cfg)
    batch, pred = _batch_and_perfect_pred()
    total, parts = crit(pred, batch)
    assert set(parts) == {"agl", "mag", "direction", "scale"}
    assert total.item() == pytest.approx(0.0, abs=1e-5)
    noisy = {k: (v + 0.3 * torch.randn_like(v)).requires_grad_() for k, v in pred.items()}
    total, parts = crit(noisy, batch)
    expected = 1.5 * parts["agl"] + 0.5 * parts["mag"] + 3.0 * parts["direction"] + 7.0 * parts["scale"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5) and total.item() > 1e-3
    assert all(p.item() > 0 for p in parts.values()) and not any(p.requires_grad for p in parts.values())
    total.backward()
    assert all(torch.isfinite(v.grad).all() for v in noisy.values())


def test_criterion_is_fp32_under_low_precision_preds():
    crit = build_criterion(LossConfig())
    batch, pred = _batch_and_perfect_pred()
    pred = {k: (v + 0.1).to(torch.bfloat16) for k, v in pred.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = crit(pred, batch)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(p.dtype == torch.float32 for p in parts.values())


def test_turn_consistency_is_zero_when_a_crop_and_its_half_turn_agree():
    from geopose_ray.losses import turn_consistency

    d = torch.nn.functional.normalize(torch.randn(3, 2), dim=1)
    assert turn_consistency(torch.cat([d, -d])).item() == pytest.approx(0.0, abs=1e-6)
    assert turn_consistency(torch.cat([d, -2.0 * d])).item() == pytest.approx(0.0, abs=1e-6)  # the norm is free
    assert turn_consistency(torch.cat([d, d])).item() == pytest.approx(2.0, abs=1e-5)  # a frame-fixed answer
    quarter = torch.stack([d[:, 1], -d[:, 0]], dim=1)  # each twin 90 degrees off
    assert turn_consistency(torch.cat([d, -quarter])).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("weight", [0.0, 4.0])
def test_criterion_adds_the_turn_term_only_on_half_turned_batches_with_a_weight(weight):
    from geopose_ray.data.dataset import half_turn_collate

    batch, pred = _batch_and_perfect_pred(b=2)
    items = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    turned = half_turn_collate(items)
    pred = {k: torch.cat([v, v]) for k, v in pred.items()}  # both views answer alike: inconsistent
    crit = build_criterion(LossConfig(turn_weight=weight))
    _, plain = crit({k: v[:2] for k, v in pred.items()}, batch)
    assert "turns" not in plain  # an ordinary batch has no pairs
    total, parts = crit(pred, turned)
    assert ("turns" in parts) == (weight > 0)
    if weight:
        assert parts["turns"].item() == pytest.approx(2.0, abs=1e-5)
        rest = sum(crit.weights[k] * v for k, v in parts.items() if k != "turns")
        assert total.item() == pytest.approx(rest.item() + weight * 2.0, rel=1e-5)
