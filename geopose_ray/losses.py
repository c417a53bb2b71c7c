"""Training losses: NaN-masked dense AGL/MAG losses (a plain dict registry), direction, scale.

Every loss runs in fp32 with autocast off (tile-sized sums overflow fp16). Dense targets are NaN
where there is no lidar; those pixels are ignored, and a batch without one valid pixel gives a
zero loss that still has a graph (so backward and DDP's all-reduce stay uniform across workers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from geopose_ray.config import LossConfig
from geopose_ray.constants import CITIES

R2_EPS = 1e-8  # 1st place r2_loss: (sum (t-p)^2 + 1e-8) / (sum (t-mean)^2 + 1e-8)

DenseLoss = Callable[[Tensor, Tensor, Tensor], Tensor]  # (pred, target, city) -> scalar


def _masked(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """pred and target with NaN-target pixels set to 0 in both, the valid mask, all fp32."""
    valid = torch.isfinite(target)
    pred = torch.where(valid, pred.float(), 0.0)
    return pred, torch.where(valid, target.float(), 0.0), valid


def _valid_mean(total: Tensor, valid: Tensor) -> Tensor:
    return total / valid.sum().clamp(min=1)


def masked_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over valid pixels (units²: m² for AGL, px² for MAG)."""
    p, t, valid = _masked(pred, target)
    return _valid_mean(F.mse_loss(p, t, reduction="sum"), valid)


def masked_huber(pred: Tensor, target: Tensor, delta: float) -> Tensor:
    """Huber loss over valid pixels; `delta` in the target's units (2nd place: 5 m, 10 px)."""
    p, t, valid = _masked(pred, target)
    return _valid_mean(F.huber_loss(p, t, reduction="sum", delta=delta), valid)


def masked_focal_mse(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """1st place focal MSE: (x-y)² · (2·sigmoid(beta·|x-y|) - 1), which down-weights small
    errors (speckle noise) relative to MSE; zero at a perfect prediction."""
    p, t, valid = _masked(pred, target)
    d = p - t
    return _valid_mean((d * d * (2 * torch.sigmoid(beta * d.abs()) - 1)).sum(), valid)


def r2_per_city(pred: Tensor, target: Tensor, city: Tensor, means: Tensor | None = None) -> Tensor:
    """1st place per-city 1 - R²: (sum (t-p)² + 1e-8) / (sum (t - mean_c)² + 1e-8) for each city
    in the batch, averaged over those cities, so each city weighs the same as in the metric.

    `means` (len(CITIES),) is a FIXED per-city target mean from the training split (a batch
    mean would make the loss depend on the crop); NaN entries or None use the batch's city mean.
    """
    p, t, valid = _masked(pred, target)
    per_image_city = city.view(-1, *([1] * (target.ndim - 1)))  # (B, 1, 1, 1)
    ratios = []
    for k in range(len(CITIES)):
        sel = valid & (per_image_city == k)
        n = sel.sum()
        if n == 0:
            continue
        fixed = means is not None and bool(torch.isfinite(means[k]))
        mean = means[k] if fixed else t[sel].mean()
        num = torch.where(sel, p - t, 0.0).square().sum()
        den = torch.where(sel, t - mean, 0.0).square().sum()
        ratios.append((num + R2_EPS) / (den + R2_EPS))
    if not ratios:
        return p.sum() * 0.0
    return torch.stack(ratios).mean()


def _mse(**_: Any) -> DenseLoss:
    return lambda p, t, c: masked_mse(p, t)


def _huber(delta: float, **_: Any) -> DenseLoss:
    return lambda p, t, c: masked_huber(p, t, delta)


def _focal_mse(beta: float, **_: Any) -> DenseLoss:
    return lambda p, t, c: masked_focal_mse(p, t, beta)


def _r2_city(means: Tensor | None, **_: Any) -> DenseLoss:
    return lambda p, t, c: r2_per_city(p, t, c, None if means is None else means.to(p.device))


DENSE_LOSSES: dict[str, Callable[..., DenseLoss]] = {
    "mse": _mse,
    "huber": _huber,
    "focal_mse": _focal_mse,
    "r2_city": _r2_city,
}


def build_dense_loss(name: str, *, delta: float, beta: float, means: Tensor | None = None) -> DenseLoss:
    """A (pred, target, city) -> scalar loss by name; unknown names list the valid ones."""
    if name not in DENSE_LOSSES:
        raise ValueError(f"unknown dense loss {name!r}; valid: {sorted(DENSE_LOSSES)}")
    return DENSE_LOSSES[name](delta=delta, beta=beta, means=means)


def direction_loss(pred: Tensor, target: Tensor, mse_lambda: float) -> Tensor:
    """(1 - cos(pred, target)) + lambda · MSE(pred, target), pred (B, 2) raw, target unit (B, 2).

    The MSE is on the RAW prediction on purpose: on normalised vectors it would equal 1 - cos
    exactly (|u - v|²/2 = 1 - cos for unit vectors) and add nothing. On the raw vector it pins
    the norm near 1, which keeps the cosine's gradient (∝ 1/|v|) well scaled and lets TTA and
    ensembles average raw vectors (1st place) without one member dominating.
    """
    pred, target = pred.float(), target.float()
    cos = F.cosine_similarity(pred, target, dim=1, eps=1e-8)
    return (1 - cos).mean() + mse_lambda * F.mse_loss(pred, target)


def turn_consistency(direction: Tensor) -> Tensor:
    """1 - cos between each crop's direction and its half turn's turned back: `direction` (2n, 2)
    holds n crops, then the same crops turned 180 degrees (data.dataset.half_turn_collate), whose
    true directions are the negatives.

    Why: a single view misses the angle by far more than the D4 average of its views, so each
    view errs its own way. The supervised loss only pulls every view towards the truth; this term
    also pulls the two views of a crop towards each other (a consistency loss on labelled pairs,
    as AugMix does for its augmentations), with no extra forward pass: both are in the batch.
    """
    n = direction.shape[0] // 2
    d = direction.float()
    return (1 - F.cosine_similarity(d[:n], -d[n : 2 * n], dim=1, eps=1e-8)).mean()


def scale_loss(pred: Tensor, target: Tensor) -> Tensor:
    """MSE of the vector-flow scale, pred (B, 1) and target (B,) in px/m."""
    return F.mse_loss(pred.float().view(-1), target.float().view(-1))


def city_mean_tensor(city_means: dict[str, tuple[float, float]] | None, index: int) -> Tensor | None:
    """(len(CITIES),) means from {city: (agl m, mag px)}: `index` 0 = AGL, 1 = MAG; NaN = absent."""
    if city_means is None:
        return None
    unknown = set(city_means) - set(CITIES)
    if unknown:
        raise ValueError(f"city_means has unknown cities {sorted(unknown)}; valid: {list(CITIES)}")
    nan = float("nan")
    return torch.tensor([float(city_means[c][index]) if c in city_means else nan for c in CITIES])


class Criterion:
    """criterion(pred, batch) -> (total, parts): the weighted sum of the AGL, MAG, direction and
    scale losses, and the unweighted parts (detached, for logging) keyed like the predictions.

    pred: the model's dict (agl/mag (B, 1, H, W), scale (B, 1), direction (B, 2)); batch: agl
    (B, 1, H, W) m NaN, mag (B, 1, H, W) px NaN, scale (B,) px/m, direction (B, 2), city (B,).
    """

    def __init__(
        self,
        agl_loss: DenseLoss,
        mag_loss: DenseLoss,
        weights: dict[str, float],
        dir_mse_lambda: float = 1.0,
    ):
        self.agl_loss, self.mag_loss = agl_loss, mag_loss
        self.weights = weights  # keys: agl, mag, direction, scale, and turns when it is > 0
        self.dir_mse_lambda = dir_mse_lambda

    def __call__(self, pred: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        device_type = pred["agl"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            city = batch["city"].to(pred["agl"].device)
            parts = {
                "agl": self.agl_loss(pred["agl"], batch["agl"], city),
                "mag": self._mag_part(pred, batch, city),
                "direction": direction_loss(pred["direction"], batch["direction"], self.dir_mse_lambda),
                "scale": scale_loss(pred["scale"], batch["scale"]),
            }
            if self.weights.get("turns", 0.0) > 0 and "half_turned" in batch:
                parts["turns"] = turn_consistency(pred["direction"])
            total = sum(self.weights[k] * v for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}

    def _mag_part(self, pred: dict[str, Tensor], batch: dict[str, Tensor], city: Tensor) -> Tensor:
        """MAG loss; with a dense direction head ("flow" (B, 2, H, W) px) the flow's loss against
        the true field mag * (sin a, cos a) is added, so every valid pixel supervises the angle."""
        loss = self.mag_loss(pred["mag"], batch["mag"], city)
        if "flow" in pred:
            direction = batch["direction"].float().to(batch["mag"].device)[:, :, None, None]  # (B, 2, 1, 1)
            loss = loss + self.mag_loss(pred["flow"], batch["mag"].float() * direction, city)
        return loss


def build_criterion(cfg: LossConfig, city_means: dict[str, tuple[float, float]] | None = None) -> Criterion:
    """Criterion from LossConfig; `city_means` {city: (mean AGL m, mean MAG px)} from the training
    split (data.dataset.city_means) feeds r2_city; None falls back to batch means."""
    agl = build_dense_loss(
        cfg.agl_loss, delta=cfg.huber_delta, beta=cfg.focal_beta, means=city_mean_tensor(city_means, 0)
    )
    mag = build_dense_loss(
        cfg.mag_loss, delta=cfg.mag_huber_delta, beta=cfg.focal_beta, means=city_mean_tensor(city_means, 1)
    )
    weights = {
        "agl": cfg.agl_weight,
        "mag": cfg.mag_weight,
        "direction": cfg.dir_weight,
        "scale": cfg.scale_weight,
        "turns": cfg.turn_weight,
    }
    return Criterion(agl, mag, weights, dir_mse_lambda=cfg.dir_mse_lambda)
