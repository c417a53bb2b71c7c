"""Validation: a model's loss and official score on full tiles (`validate`), with DDP ranks'
disjoint shards summed (`dist_sum`). Its own module: `train_loop.fit` validates after epochs,
the benches score models with it alone. No `ray` import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from geopose_ray.constants import CITIES
from geopose_ray.device import autocast, to_device
from geopose_ray.metrics import GeoposeScore
from geopose_ray.predict import merge_views
from geopose_ray.step_stats import is_distributed
from geopose_ray.tta import View


def dist_sum(array: np.ndarray) -> np.ndarray:
    """Sum a float64 array over DDP ranks (identity when not distributed): validation's `reduce`."""
    if not is_distributed():
        return array
    t = torch.as_tensor(array, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def _score_batch(score: GeoposeScore, batch: dict[str, Any], pred: dict[str, torch.Tensor]) -> np.ndarray:
    """Add a batch to `score`; returns the batch's summed (angle error deg, |scale error| / scale),
    the image-level diagnostics that tell a wrong angle from a wrong scale."""
    agl_t = batch["agl"][:, 0].float().cpu().numpy()  # (B, H, W) m NaN
    agl_p = pred["agl"][:, 0].float().cpu().numpy()  # (B, H, W) m
    dir_t = batch["direction"].float().cpu().numpy()  # (B, 2) (sin, cos)
    dir_p = pred["direction"].float().cpu().numpy()
    scale_t = batch["scale"].float().cpu().numpy().reshape(-1)  # (B,) px/m
    scale_p = pred["scale"].float().cpu().numpy().reshape(-1)
    errors = np.zeros(2)
    for b, c in enumerate(batch["city"].reshape(-1).tolist()):
        angle_t, angle_p = math.atan2(dir_t[b, 0], dir_t[b, 1]), math.atan2(dir_p[b, 0], dir_p[b, 1])
        score.update(
            CITIES[c], agl_t[b], agl_p[b], float(scale_t[b]), angle_t, float(scale_p[b]), angle_p,
            nan_pred_fails=True,
        )  # fmt: skip
        errors[0] += abs(math.degrees(math.remainder(angle_p - angle_t, 2 * math.pi)))
        errors[1] += abs(float(scale_p[b]) - float(scale_t[b])) / max(abs(float(scale_t[b])), 1e-9)
    return errors


def score_metrics(score: GeoposeScore) -> dict[str, float]:
    """Flat metrics from a score: `score` (mean over the cities present in the fold), score_<CITY>,
    agl_r2 and vflow_r2 (means over the cities present)."""
    res = score.compute()
    out = {"score": float(res["final_present"])}
    out.update({f"score_{c}": float(v) for c, v in res["cities"].items()})
    for key in ("agl_r2", "vflow_r2"):
        vals = [v for v in res[key].values() if not math.isnan(v)]
        out[key] = float(np.mean(vals)) if vals else math.nan
    return out


def _predict(
    model: nn.Module,
    batch: dict[str, Any],
    device: torch.device,
    precision: str,
    views: tuple[View, ...] | None,
) -> dict[str, torch.Tensor]:
    """The model's float32 outputs for a batch; with `views`, each tile's test-time merge by the
    ensemble's own code (`predict.merge_views`: the views batched, padded to the model's size
    multiple, turned back and averaged). Only what the score reads is merged."""
    if views is None:
        with autocast(device, precision):
            pred = model(batch["image"], batch["gsd"], batch["city"])
        return {k: v.float() for k, v in pred.items()}
    merged = [
        merge_views(model, image, float(gsd), int(city), views, precision, per_view_loop=False)
        for image, gsd, city in zip(batch["image"], batch["gsd"], batch["city"])
    ]
    return {
        "agl": torch.stack([agl for agl, _, _ in merged])[:, None],  # (B, 1, H, W) m
        "scale": torch.tensor([[scale] for _, scale, _ in merged], device=device),  # (B, 1) px/m
        "direction": torch.as_tensor(np.stack([d for _, _, d in merged]), device=device),  # (B, 2) unit
    }


@torch.inference_mode()
def validate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    criterion: Callable,
    device: torch.device,
    precision: str,
    reduce: Callable[[np.ndarray], np.ndarray] | None = None,
    keep: dict[str, np.ndarray] | None = None,
    views: tuple[View, ...] | None = None,
) -> dict[str, float]:
    """val_loss (per-image mean) and the official score on `loader` (full tiles). `keep`, when
    given, receives the reduced metric accumulators as `keep["val_score"]`
    (`GeoposeScore.to_array()`, (cities, fields) float64): the fold's out-of-fold statistics.
    With test-time `views` (`tta.views_for`) the score is that of their merge and val_loss is
    NaN: the loss's dense terms would need every view's maps, and nothing steers by it there.

    Under DDP each rank passes its own disjoint shard and `reduce` (e.g. `dist_sum`) adds the
    per-city sums, so no padded duplicate is counted. Pass the unwrapped model: no DDP collective
    runs here, so ranks may see different numbers of batches.
    """
    model.eval()
    score, loss_sum, count, errors = GeoposeScore(), 0.0, 0, np.zeros(2)
    for batch in loader:
        batch = to_device(batch, device)
        pred = _predict(model, batch, device, precision, views)
        n = batch["image"].shape[0]
        loss = criterion(pred, batch)[0] if views is None else math.nan
        loss_sum, count = loss_sum + float(loss) * n, count + n
        errors += _score_batch(score, batch, pred)
    totals = np.concatenate([score.to_array().ravel(), errors, [loss_sum, count]])
    if reduce is not None:
        totals = reduce(totals)
    score = GeoposeScore.from_array(totals[:-4])  # the fold's sums (all ranks); shaped by GeoposeScore
    if keep is not None:
        keep["val_score"] = score.to_array()
    metrics = score_metrics(score)
    n = totals[-1]
    metrics["val_loss"] = float(totals[-2] / n) if n > 0 else math.nan
    metrics["angle_err_deg"] = float(totals[-4] / n) if n > 0 else math.nan  # mean |angle error|
    metrics["scale_rel_err"] = float(totals[-3] / n) if n > 0 else math.nan  # mean |scale error| / scale
    return metrics
