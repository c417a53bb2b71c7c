"""Predict one tile with one or more trained models: TTA views batched into one forward pass,
exact de-augmentation, optional overlapping windows for tiles too large for one pass, AMP on GPU.

Ray-free on purpose (docs/ARCHITECTURE.md, 'Why the cores are Ray-free'): this runs on a GPU box that has torch but no Ray, and the
ensemble's Ray actors call it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from geopose_ray.config import Config
from geopose_ray.constants import city_index
from geopose_ray.device import autocast
from geopose_ray.tta import View, apply_view, invert_direction, invert_view, shape_groups, views_for


@dataclass
class Prediction:
    agl: np.ndarray  # (H, W) float32 metres
    scale: float  # px/m
    direction: np.ndarray  # (2,) unit vector (sin a, cos a): x = column, y = row down

    @property
    def angle(self) -> float:
        """Radians, atan2(x, y) as the official files hold it."""
        return float(math.atan2(self.direction[0], self.direction[1]))


def unit(v: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis; a zero vector becomes (0, 1) (angle 0) instead of NaN."""
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    fallback = np.broadcast_to(np.array([0.0, 1.0]), v.shape)
    return np.where(n > 1e-12, v / np.maximum(n, 1e-12), fallback)


def blend_predictions(preds: Sequence[Prediction], weights: Sequence[float] | None = None) -> Prediction:
    """Weighted mean of AGL and of scale; weighted circular mean of the direction (sum of the
    weighted unit vectors, renormalised), which is correct across the +-pi seam of the angle."""
    if not preds:
        raise ValueError("nothing to blend")
    w = np.ones(len(preds)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(preds),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {len(preds)} non-negative weights with a positive sum, got {w}")
    w = w / w.sum()
    agl = sum(wi * p.agl.astype(np.float64) for wi, p in zip(w, preds))
    direction = unit(sum(wi * unit(p.direction) for wi, p in zip(w, preds)))
    scale = float(sum(wi * p.scale for wi, p in zip(w, preds)))
    return Prediction(agl=agl.astype(np.float32), scale=scale, direction=direction)


def load_member(
    checkpoint_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config]:
    """A checkpoint folder (`state.pt`) -> (model in eval mode on `device`, its Config)."""
    from geopose_ray.checkpoint import load_model_from_checkpoint

    return load_model_from_checkpoint(checkpoint_dir, map_location=device)


def _forward_padded(model: torch.nn.Module, x: torch.Tensor, gsd: float, city: int, precision: str) -> dict:
    """Model outputs for (B, 3, h, w) views, reflect-padded to the model's size multiple and
    cropped back, in float32."""
    h, w = x.shape[-2:]
    div = int(getattr(model, "divisor", 1) or 1)
    ph, pw = -h % div, -w % div
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
    if ph or pw:
        x = F.pad(x, pads, mode="reflect" if max(ph, pw) < min(h, w) else "replicate")
    b = x.shape[0]
    gsd_t = torch.full((b,), float(gsd), dtype=torch.float32, device=x.device)  # (B,) m/px
    city_t = torch.full((b,), int(city), dtype=torch.int64, device=x.device)  # (B,)
    with autocast(x.device, precision):
        out = model(x, gsd_t, city_t)
    agl = out["agl"][..., pads[2] : pads[2] + h, pads[0] : pads[0] + w].float()  # (B, 1, h, w) m
    return {"agl": agl[:, 0], "scale": out["scale"].float().reshape(b), "direction": out["direction"].float()}


def merge_views(
    model: torch.nn.Module,
    image: torch.Tensor,
    gsd: float,
    city: int,
    views: tuple[View, ...],
    precision: str,
    per_view_loop: bool,
) -> tuple[torch.Tensor, float, np.ndarray]:
    """TTA-merged (AGL (H, W) m, scale px/m, unit direction) of one (3, H, W) image."""
    h, w = image.shape[-2:]
    groups = [[i] for i in range(len(views))] if per_view_loop else shape_groups(views, h, w)
    agl = torch.zeros((h, w), dtype=torch.float32, device=image.device)
    direction = torch.zeros(2, dtype=torch.float32, device=image.device)
    scale = 0.0
    for group in groups:
        batch = torch.stack([apply_view(image, views[i]) for i in group])  # (V, 3, h', w')
        out = _forward_padded(model, batch, gsd, city, precision)
        for j, i in enumerate(group):
            agl += invert_view(out["agl"][j], views[i])
            direction += invert_direction(out["direction"][j], views[i])
            scale += float(out["scale"][j])
    n = len(views)
    return agl / n, scale / n, unit(direction.cpu().numpy())


def window_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of `tile` px covering `size` px, neighbours overlapping >= overlap."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the window {tile}")
    return [*range(0, size - tile, stride), size - tile]


def window_weight_1d(length: int, lead: bool, trail: bool, overlap: int) -> np.ndarray:
    """Blend weights along one axis of a window. On a side shared with a neighbour the first
    overlap/4 px get weight 0 (zero padding corrupts a window's rim), the next overlap/2 px a
    raised-cosine ramp; neighbours' ramps sum to 1 where they meet. Image borders keep weight 1."""
    m = overlap // 4
    r = max(overlap - 2 * m, 1)
    ramp = np.sin(0.5 * np.pi * (np.arange(r) + 0.5) / r) ** 2
    profile = np.concatenate([np.zeros(m), ramp])[:length]  # from the shared edge inwards
    w = np.ones(length)
    if lead:
        w[: len(profile)] *= profile
    if trail:
        w[length - len(profile) :] *= profile[::-1]
    return w


def _windows(h: int, w: int, tile: int, overlap: int):
    """(row slice, col slice, (th, tw) weight map) for each window of an (h, w) image."""
    rows, cols = window_starts(h, tile, overlap), window_starts(w, tile, overlap)
    th, tw = min(h, tile), min(w, tile)
    for r in rows:
        wr = window_weight_1d(th, r > 0, r + th < h, overlap)
        for c in cols:
            wc = window_weight_1d(tw, c > 0, c + tw < w, overlap)
            yield slice(r, r + th), slice(c, c + tw), np.outer(wr, wc).astype(np.float32)


def _predict_tiled(model, image, gsd, city, views, precision, per_view_loop, max_tile, overlap) -> Prediction:
    """Overlapping windows, each TTA-predicted, AGL blended by the window weights; scale and
    direction averaged with each window's total weight."""
    h, w = image.shape[-2:]
    div = int(getattr(model, "divisor", 1) or 1)
    tile = max(div, max_tile // div * div)
    agl = torch.zeros((h, w), dtype=torch.float32, device=image.device)
    wsum = torch.zeros((h, w), dtype=torch.float32, device=image.device)
    scale, direction, mass = 0.0, np.zeros(2), 0.0
    for rs, cs, weight in _windows(h, w, tile, overlap):
        a, s, d = merge_views(model, image[:, rs, cs], gsd, city, views, precision, per_view_loop)
        wt = torch.from_numpy(weight).to(image.device)
        agl[rs, cs] += a * wt
        wsum[rs, cs] += wt
        m = float(weight.sum())
        scale, direction, mass = scale + m * s, direction + m * d, mass + m
    agl = (agl / wsum.clamp_min(1e-12)).cpu().numpy()
    return Prediction(agl=agl, scale=scale / mass, direction=unit(direction))


@torch.inference_mode()
def predict_tile(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    image: np.ndarray,
    gsd: float,
    city: int | str,
    tta: str = "none",
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    max_tile: int | None = None,
    overlap: int = 128,
    per_view_loop: bool = False,
) -> list[Prediction]:
    """Predict an (H, W, 3) uint8 tile with every model.

    Returns one Prediction per model; with `weights` (one per model) the list holds only their
    blend. `max_tile` splits larger tiles into overlapping windows (`overlap` px); the views of
    each window run as one batch unless `per_view_loop` (kept for benchmarking).
    """
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    city = city_index(city) if isinstance(city, str) else int(city)
    views = views_for(tta)
    dev = torch.device(device) if device is not None else next(models[0].parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image)).to(dev).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    preds = []
    for model in models:
        if max_tile and max(x.shape[-2:]) > max_tile:
            preds.append(
                _predict_tiled(model, x, gsd, city, views, precision, per_view_loop, max_tile, overlap)
            )
        else:
            a, s, d = merge_views(model, x, gsd, city, views, precision, per_view_loop)
            preds.append(Prediction(agl=a.cpu().numpy(), scale=s, direction=d))
    return preds if weights is None else [blend_predictions(preds, weights)]
