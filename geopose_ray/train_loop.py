"""The training core: optimizer and schedule by name, one epoch with AMP / accumulation / clipping /
non-finite-loss guard, full-tile validation with the official score, and `fit`, the epoch loop.

No `ray` import here or below: the Ray Train adapter (`tune/trainer.py`) and the single-process CLI
(`train.py`) both drive `fit` through its hooks (`reporter`, `wrap_model`, `wrap_loader`; the
fault tests add `loss_hook`).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn

from geopose_ray.checkpoint import init_from_checkpoint, load_weights, make_state, restore_state, unwrap
from geopose_ray.config import Config
from geopose_ray.constants import CITIES
from geopose_ray.data.dataset import city_means, target_units
from geopose_ray.data.loaders import build_loaders, split_samples, start_epoch
from geopose_ray.losses import build_criterion
from geopose_ray.metrics import GeoposeScore
from geopose_ray.models import build_model
from geopose_ray.optim import build_optimizer, build_scheduler, is_per_epoch
from geopose_ray.step_stats import (
    StepStats,
    Totals,
    backward,
    end_group,
    finite_flag,
    gate_mode,
    is_distributed,
)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

Reporter = Callable[[dict[str, float], Callable[[], dict[str, Any]] | None], None]
LossHook = Callable[[int, torch.Tensor], torch.Tensor]  # (global step, loss) -> loss


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run has diverged (GEOPOSE_SPEC section 8, AMP)."""


# --- set-up -------------------------------------------------------------------------------------
def setup_worker(cfg: Config, rank: int = 0) -> None:
    """Seed every RNG (per rank, so DDP workers do not augment identically) and set threads."""
    seed = cfg.train.seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)


def autocast_dtype(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, None = fp32; whether a GradScaler is needed) for a precision name.

    fp16 needs loss scaling, which only CUDA supports; on CPU it falls back to bf16 autocast.
    """
    cuda = device.type == "cuda"
    table = {
        "auto": (torch.bfloat16 if cuda else None, False),
        "bf16": (torch.bfloat16, False),
        "fp16": (torch.float16 if cuda else torch.bfloat16, cuda),
        "fp32": (None, False),
    }
    if precision not in table:
        raise ValueError(f"unknown precision {precision!r}; known: {PRECISIONS}")
    return table[precision]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# --- one epoch ----------------------------------------------------------------------------------
def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def _check_streak(totals: Totals, limit: int) -> None:
    if totals.hit >= 0:
        raise NonFiniteLossError(
            f"{limit} non-finite losses in a row (global step {totals.hit}); "
            "lower the lr, use fp32 or bf16, or check the data"
        )


EMA_POWER = 0.5  # the EMA window grows as step^EMA_POWER (build_ema)


def build_ema(model: nn.Module, cfg: Config, start_state: dict[str, Any] | None = None) -> ModelEmaV3 | None:
    """An exponential moving average of the weights (timm's ModelEmaV3), or None when
    `ema_decay` is 0. Validation, checkpoints and inference use it: the raw weights of a short,
    high-lr run swing from epoch to epoch (the score by +-0.1 on the embedded default), which
    makes ASHA's rungs and the trial ranking noise. Its decay warms up, 1 - (1 + step)^(-1/2)
    capped at `ema_decay`, so it averages over ~sqrt(step) steps: a window that grows with the
    run, whatever its length (20 steps after 400, 100 after 10,000). timm's default power, 2/3,
    lagged a fast-improving run by 0.03-0.08 in its second half (docs/LEARNING.md). A resumed
    run continues the saved average."""
    if cfg.train.ema_decay <= 0:
        return None
    ema = ModelEmaV3(unwrap(model), decay=cfg.train.ema_decay, use_warmup=True, warmup_power=EMA_POWER)
    if start_state is not None and "ema" in start_state:
        load_weights(ema.module, start_state["ema"])
    return ema


def _forward_loss(model, criterion, batch, device, dtype) -> tuple[torch.Tensor, dict[str, Any]]:
    with _autocast(device, dtype):
        pred = model(batch["image"], batch["gsd"], batch["city"])
        loss, parts = criterion(pred, batch)
    return loss.float(), parts


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    cfg: Config,
    step_offset: int = 0,
    loss_hook: LossHook | None = None,
    ema: ModelEmaV3 | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns flat metrics (train_loss, train_<part>, lr, nonfinite_steps,
    imgs_per_s, epoch_time_s).

    `scheduler` is stepped after every optimizer step unless it is per-epoch (plateau). A
    non-finite loss adds no gradient and counts; `cfg.train.max_nonfinite` of them in a row raise
    NonFiniteLossError naming the global step where the streak reached it. Batch i of this epoch
    is global step `step_offset + i` (0-based): `loss_hook(step, loss)`, when given, sees every
    loss before the finiteness check (the fault tests make it NaN at chosen steps). `ema` follows
    the weights after every optimizer step.

    Host syncs: sums, counts and the streak live on the device (`StepStats`) and are read every
    `cfg.train.sync_every` micro-batches and at the end, so a streak raises at the next sync point
    (up to sync_every - 1 micro-batches late; the step named is exact). sync_every = 1 is the old
    loop ("host" gate). Above 1, a group whose last micro-batch is non-finite is skipped with no
    host read by a fused Adam / AdamW ("device" gate, `step_stats.gate_mode`; `fit` builds it
    fused on a GPU): weights, optimizer state and EMA are those of sync_every = 1 with the same optimizer,
    bit for bit, but a per-step scheduler still steps on the skipped group (its lr then runs one
    step ahead). Other optimizers, or a GradScaler, read one flag per group ("group" gate), exact.
    """
    tcfg, ocfg = cfg.train, cfg.optim
    model.train()
    dtype, _ = autocast_dtype(tcfg.precision, device)
    accum, n, every = max(1, ocfg.grad_accum), len(loader), tcfg.sync_every
    gate, stats = gate_mode(every, optimizer, scaler), StepStats(device, tcfg.max_nonfinite)
    params = [p for p in model.parameters() if p.requires_grad]
    imgs, totals = 0, None
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        batch = to_device(batch, device, tcfg.channels_last)
        group = min(accum, n - (i - i % accum))  # micro-batches in this accumulation group
        last = i % accum == group - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss, parts = _forward_loss(model, criterion, batch, device, dtype)
            if loss_hook is not None:
                loss = loss_hook(step_offset + i, loss)
            imgs += batch["image"].shape[0]
            finite = finite_flag(loss)  # () bool, the same on every rank
            stats.add(step_offset + i, loss, parts, finite)
            ok = backward(loss, finite, scaler, group, gate, None if last else params)
        if last:
            ema_step = (step_offset + i) // accum + 1  # optimizer steps so far
            end_group(model, optimizer, scaler, scheduler, ema, ocfg.grad_clip, ok, gate, ema_step)
        if (i + 1) % every == 0 or i == n - 1:
            totals = stats.sync()
            _check_streak(totals, tcfg.max_nonfinite)
    elapsed = time.perf_counter() - t0
    totals = totals or stats.sync()
    metrics = {"train_loss": math.nan, **{k: v / max(1, totals.finite) for k, v in totals.sums.items()}}
    metrics.update(lr=optimizer.param_groups[0]["lr"], nonfinite_steps=float(totals.nonfinite))
    metrics.update(imgs_per_s=imgs / max(elapsed, 1e-9), epoch_time_s=elapsed)
    return metrics


# --- validation ---------------------------------------------------------------------------------
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


@torch.inference_mode()
def validate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    criterion: Callable,
    device: torch.device,
    precision: str,
    reduce: Callable[[np.ndarray], np.ndarray] | None = None,
    keep: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """val_loss (per-image mean) and the official score on `loader` (full tiles). `keep`, when
    given, receives the reduced metric accumulators as `keep["val_score"]`
    (`GeoposeScore.to_array()`, (cities, fields) float64): the fold's out-of-fold statistics.

    Under DDP each rank passes its own disjoint shard and `reduce` (e.g. `dist_sum`) adds the
    per-city sums, so no padded duplicate is counted. Pass the unwrapped model: no DDP collective
    runs here, so ranks may see different numbers of batches.
    """
    model.eval()
    dtype, _ = autocast_dtype(precision, device)
    score, loss_sum, count, errors = GeoposeScore(), 0.0, 0, np.zeros(2)
    for batch in loader:
        batch = to_device(batch, device)
        with _autocast(device, dtype):
            pred = model(batch["image"], batch["gsd"], batch["city"])
        pred = {k: v.float() for k, v in pred.items()}
        loss, _ = criterion(pred, batch)
        n = batch["image"].shape[0]
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


def _initial_model(
    cfg: Config, train: list, start_state: dict[str, Any] | None, device: torch.device
) -> nn.Module:
    """The model on `device`, started from `init_checkpoint` (a second stage) or given the training
    targets' output units; a resumed run's weights come from its state afterwards instead."""
    model = build_model(cfg.model)
    if cfg.model.init_checkpoint and start_state is None:
        init_from_checkpoint(model, cfg.model.init_checkpoint)
    elif start_state is None:
        model.set_target_units(*target_units(train))
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def fit(
    cfg: Config,
    *,
    reporter: Reporter | None = None,
    start_state: dict[str, Any] | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
    wrap_loader: Callable[[Any], Any] = lambda dl: dl,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    loss_hook: LossHook | None = None,
) -> dict[str, float]:
    """Train `cfg.train.epochs` epochs (from `start_state` when given); returns the last metrics.

    After every epoch `reporter(metrics, state_fn)` is called on every rank; `state_fn()` builds
    the checkpoint state, and is None on epochs that `checkpoint_every` skips. `loss_hook`: see
    `train_one_epoch`.
    """
    setup_worker(cfg, rank)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, val = split_samples(cfg)
    train_dl, val_dl = build_loaders(cfg, train, val, rank, world_size)
    train_dl = wrap_loader(train_dl)
    needs_means = "r2_city" in (cfg.loss.agl_loss, cfg.loss.mag_loss)  # the only loss that uses them
    criterion = build_criterion(cfg.loss, city_means(train) if needs_means else None)
    model = _initial_model(cfg, train, start_state, device)
    # fused (the "device" gate of train_one_epoch) only where a host read stalls a stream; on CPU
    # the per-group read costs nothing and the foreach kernels keep CPU runs as they were
    optimizer = build_optimizer(model, cfg.optim, fused=cfg.train.sync_every > 1 and device.type == "cuda")
    steps_per_epoch = math.ceil(len(train_dl) / max(1, cfg.optim.grad_accum))
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg.train.precision, device)[1])
    start, nonfinite_total = 0, 0
    if start_state is not None:
        start = restore_state(start_state, model, optimizer, scaler, scheduler, cfg, rank)
        nonfinite_total = int(start_state.get("nonfinite_total", 0))
    ema = build_ema(model, cfg, start_state)
    evaluated = model if ema is None else ema.module  # what validation, checkpoints and inference use
    trained = wrap_model(model)
    metrics: dict[str, float] = {}
    val_metrics: dict[str, float] = {}
    kept: dict[str, np.ndarray] = {}  # the last validation's accumulators, saved with checkpoints
    for epoch in range(start, cfg.train.epochs):
        start_epoch(train_dl, cfg.train.seed, rank, epoch)
        step = epoch * len(train_dl)  # global step of the epoch's first batch
        tm = train_one_epoch(
            trained, train_dl, criterion, optimizer, scheduler, scaler, device, cfg, step, loss_hook, ema
        )
        done = epoch + 1
        if not val_metrics or done % cfg.train.val_every == 0 or done == cfg.train.epochs:
            val_metrics = validate(
                evaluated, val_dl, criterion, device, cfg.train.precision, reduce=dist_sum, keep=kept
            )
            if is_per_epoch(scheduler):
                scheduler.step(val_metrics["score"] if math.isfinite(val_metrics["score"]) else -math.inf)
        nonfinite_total += int(tm["nonfinite_steps"])
        # epochs that skip validation (val_every) repeat the last validation metrics
        metrics = {"epoch": float(done), **tm, **val_metrics, "nonfinite_total": float(nonfinite_total)}
        is_ckpt = done % cfg.train.checkpoint_every == 0 or done == cfg.train.epochs

        def state_fn(done: int = done, total: int = nonfinite_total) -> dict[str, Any]:
            ema_model = None if ema is None else ema.module
            return make_state(
                model, optimizer, scaler, scheduler, done, cfg, total, kept.get("val_score"), ema_model
            )

        if reporter is not None:
            reporter(metrics, state_fn if is_ckpt else None)
    return metrics
