"""The training core: optimizer and schedule by name, one epoch with AMP / accumulation / clipping /
non-finite-loss guard, and `fit`, the epoch loop, validating with `validation.validate` (full
tiles, the official score).

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn

from geopose_ray import precise_bn
from geopose_ray.checkpoint import init_from_checkpoint, load_weights, make_state, restore_state, unwrap
from geopose_ray.config import Config
from geopose_ray.constants import MIN_BN_TILES, MIN_RUNG_BN_TILES
from geopose_ray.data.dataset import city_means, target_units
from geopose_ray.data.loaders import build_loaders, split_samples, start_epoch
from geopose_ray.device import autocast, autocast_dtype, channels_last, to_device
from geopose_ray.losses import build_criterion
from geopose_ray.models import build_model
from geopose_ray.optim import build_optimizer, build_scheduler, is_per_epoch
from geopose_ray.step_stats import (
    StepStats,
    Totals,
    backward,
    end_group,
    finite_flag,
    gate_mode,
)
from geopose_ray.tta import views_for
from geopose_ray.validation import dist_sum, validate

Reporter = Callable[[dict[str, float], Callable[[], dict[str, Any]] | None], None]
LossHook = Callable[[int, torch.Tensor], torch.Tensor]  # (global step, loss) -> loss


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run has diverged (docs/GEOPOSE.md, 'Pitfalls')."""


# --- set-up -------------------------------------------------------------------------------------
def setup_worker(cfg: Config, rank: int = 0) -> None:
    """Seed every RNG (per rank, so DDP workers do not augment identically) and set threads."""
    seed = cfg.train.seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)


# --- one epoch ----------------------------------------------------------------------------------
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


def _forward_loss(
    model, criterion, batch, device, precision: str, step: int, loss_hook: LossHook | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A micro-batch's fp32 loss and its parts; `loss_hook` (the fault tests) sees the loss first."""
    with autocast(device, precision):
        pred = model(batch["image"], batch["gsd"], batch["city"])
        loss, parts = criterion(pred, batch)
    loss = loss.float()
    return (loss if loss_hook is None else loss_hook(step, loss)), parts


def _accumulation_group(i: int, accum: int, n: int) -> tuple[int, bool]:
    """(micro-batches in the accumulation group of batch i, whether i is its last): an epoch's
    last group is shorter when `accum` does not divide the `n` batches."""
    group = min(accum, n - (i - i % accum))
    return group, i % accum == group - 1


def _grad_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces the gradients on a group's last micro-batch only (`no_sync` before it)."""
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def _epoch_metrics(
    totals: Totals, optimizer: torch.optim.Optimizer, imgs: int, elapsed: float
) -> dict[str, float]:
    """The epoch's flat metrics from its last synced totals (means over the finite losses)."""
    metrics = {"train_loss": math.nan, **{k: v / max(1, totals.finite) for k, v in totals.sums.items()}}
    metrics.update(lr=optimizer.param_groups[0]["lr"], nonfinite_steps=float(totals.nonfinite))
    metrics.update(imgs_per_s=imgs / max(elapsed, 1e-9), epoch_time_s=elapsed)
    return metrics


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
    freeze_bn: bool = False,
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
    if freeze_bn:  # normalise by the running statistics, and keep them (precise_bn.freeze)
        precise_bn.freeze(model)
    accum, n, every = max(1, ocfg.grad_accum), len(loader), tcfg.sync_every
    gate, stats = gate_mode(every, optimizer, scaler), StepStats(device, tcfg.max_nonfinite)
    params = [p for p in model.parameters() if p.requires_grad]
    imgs, totals, nhwc = 0, None, channels_last(tcfg.channels_last, device)
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        batch, step = to_device(batch, device, nhwc), step_offset + i
        group, last = _accumulation_group(i, accum, n)
        with _grad_sync(model, last):
            loss, parts = _forward_loss(model, criterion, batch, device, tcfg.precision, step, loss_hook)
            imgs += batch["image"].shape[0]
            finite = finite_flag(loss)  # () bool, the same on every rank
            stats.add(step, loss, parts, finite)
            ok = backward(loss, finite, scaler, group, gate, None if last else params)
        if last:
            ema_step = step // accum + 1  # optimizer steps so far
            end_group(model, optimizer, scaler, scheduler, ema, ocfg.grad_clip, ok, gate, ema_step)
        if (i + 1) % every == 0 or i == n - 1:
            totals = stats.sync()
            _check_streak(totals, tcfg.max_nonfinite)
    elapsed = time.perf_counter() - t0
    return _epoch_metrics(totals or stats.sync(), optimizer, imgs, elapsed)


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
    return model.to(memory_format=torch.channels_last) if channels_last(cfg.train.channels_last, device) else model


@dataclass(frozen=True)
class _Run:
    """What `fit` builds once and every epoch uses; `model` unwrapped (`wrap_model` wraps it for
    training only: validation and checkpoints use it as it is)."""

    device: torch.device
    train_dl: Any
    val_dl: Any
    criterion: Callable
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train: list  # the training tiles (cache samples): the last model's BatchNorm statistics (precise_bn)


def _build_run(
    cfg: Config,
    start_state: dict[str, Any] | None,
    wrap_loader: Callable[[Any], Any],
    rank: int,
    world_size: int,
    device: torch.device | str | None,
) -> _Run:
    """The run's loaders, criterion, model, optimizer, schedule and scaler as a fresh run has them
    (a resumed run's state is restored into them next, `_resume`)."""
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
    return _Run(device, train_dl, val_dl, criterion, model, optimizer, scheduler, scaler, train)


def _resume(run: _Run, cfg: Config, start_state: dict[str, Any] | None, rank: int) -> tuple[int, int]:
    """(first epoch to train, non-finite losses so far): (0, 0) for a fresh run, else what
    `start_state` holds, restored into the run's model, optimizer, scaler and schedule."""
    if start_state is None:
        return 0, 0
    start = restore_state(start_state, run.model, run.optimizer, run.scaler, run.scheduler, cfg, rank)
    return start, int(start_state.get("nonfinite_total", 0))


TTA_KEYS = ("score", "agl_r2", "vflow_r2", "angle_err_deg")  # reported as <key>_tta after the last epoch


def _validate_epoch(
    run: _Run, evaluated: nn.Module, cfg: Config, kept: dict[str, np.ndarray], last: bool
) -> dict[str, float]:
    """Validate `evaluated` (its accumulators into `kept`); a per-epoch (plateau) schedule steps on
    the score, a diverged (non-finite) one counting as the worst. After the `last` epoch the
    fold is also scored through `final_tta`'s views (score_tta, ...): the single-view score is
    what ASHA compares from epoch to epoch, the merged one what the ensemble delivers, and on
    sparse, tall cities the two differ by 0.3 (docs/LEARNING.md). The kept accumulators stay the
    single view's, like the score that picks the best checkpoint they are saved with."""
    val_metrics = validate(
        evaluated, run.val_dl, run.criterion, run.device, cfg.train.precision, reduce=dist_sum, keep=kept
    )
    if is_per_epoch(run.scheduler):
        run.scheduler.step(val_metrics["score"] if math.isfinite(val_metrics["score"]) else -math.inf)
    if last and cfg.train.final_tta != "none":
        views = views_for(cfg.train.final_tta)
        merged = validate(
            evaluated, run.val_dl, run.criterion, run.device, cfg.train.precision, dist_sum, None, views
        )
        val_metrics.update({f"{k}_tta": merged[k] for k in TTA_KEYS})
    return val_metrics


def _state_fn(
    run: _Run, cfg: Config, ema: ModelEmaV3 | None, done: int, total: int, kept: dict[str, np.ndarray]
) -> Callable[[], dict[str, Any]]:
    """The checkpoint state after epoch `done`, built only when the reporter asks for it."""

    def state_fn() -> dict[str, Any]:
        ema_model = None if ema is None else ema.module
        return make_state(
            run.model,
            run.optimizer,
            run.scaler,
            run.scheduler,
            done,
            cfg,
            total,
            kept.get("val_score"),
            ema_model,
        )

    return state_fn


def _remeasures(cfg: Config, done: int) -> bool:
    """Whether the statistics are re-measured before epoch `done`'s validation: after the last
    epoch, and after every `precise_bn_every`-th. Only the evaluated model's running statistics
    change, which training in train mode never reads: with the weights' average on (the
    evaluated model), the weights trained are the same."""
    every = cfg.train.precise_bn_every
    return cfg.train.precise_bn and (done == cfg.train.epochs or (every > 0 and done % every == 0))


def _bn_tiles(run: _Run, cfg: Config, cached: dict[bool, list], rung: bool) -> list[dict[str, Any]]:
    """The tiles a re-measure reads, loaded once: fewer large ones before a rung, which only
    ranks trials (constants.MIN_RUNG_BN_TILES), than after the last epoch, which is delivered."""
    if rung not in cached:
        floor = MIN_RUNG_BN_TILES if rung else MIN_BN_TILES
        cached[rung] = precise_bn.bn_batches(run.train, cfg.data.val_crop, cfg.data.val_batch_size, floor)
    return cached[rung]


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
    the checkpoint state, and is None on epochs that `checkpoint_every` or `val_every` skips. `loss_hook`: see
    `train_one_epoch`.
    """
    setup_worker(cfg, rank)
    run = _build_run(cfg, start_state, wrap_loader, rank, world_size, device)
    start, nonfinite_total = _resume(run, cfg, start_state, rank)
    ema = build_ema(run.model, cfg, start_state)
    evaluated = run.model if ema is None else ema.module  # what validation, checkpoints and inference use
    trained = wrap_model(run.model)
    metrics: dict[str, float] = {}
    val_metrics: dict[str, float] = {}
    kept: dict[str, np.ndarray] = {}  # the last validation's accumulators, saved with checkpoints
    frozen_from = precise_bn.freeze_start(cfg.train.epochs, cfg.train.bn_freeze)
    batches: dict[bool, list[dict[str, Any]]] = {}  # precise_bn's tiles by "for a rung", loaded when first needed
    for epoch in range(start, cfg.train.epochs):
        start_epoch(run.train_dl, cfg.train.seed, rank, epoch)
        step = epoch * len(run.train_dl)  # global step of the epoch's first batch
        if epoch == frozen_from:  # the trained weights' own statistics, kept from here on
            precise_bn.recompute(run.model, _bn_tiles(run, cfg, batches, False), run.device, cfg.train.precision)
        tm = train_one_epoch(
            trained, run.train_dl, run.criterion, run.optimizer, run.scheduler, run.scaler, run.device, cfg,
            step, loss_hook, ema, freeze_bn=epoch >= frozen_from,
        )  # fmt: skip
        done = epoch + 1
        validates = not val_metrics or done % cfg.train.val_every == 0 or done == cfg.train.epochs
        if validates and _remeasures(cfg, done):  # the evaluated model: statistics of its own weights
            rung = done < cfg.train.epochs
            precise_bn.recompute(evaluated, _bn_tiles(run, cfg, batches, rung), run.device, cfg.train.precision)
        if validates:
            val_metrics = _validate_epoch(run, evaluated, cfg, kept, last=done == cfg.train.epochs)
        nonfinite_total += int(tm["nonfinite_steps"])
        # epochs that skip validation (val_every) repeat the last validation metrics
        metrics = {"epoch": float(done), **tm, **val_metrics, "nonfinite_total": float(nonfinite_total)}
        # a checkpoint only where its weights were validated: the score it is kept and chosen by
        # (and the accumulators saved with it) are then its own, not an earlier epoch's
        is_ckpt = validates and (done % cfg.train.checkpoint_every == 0 or done == cfg.train.epochs)
        if reporter is not None:
            reporter(metrics, _state_fn(run, cfg, ema, done, nonfinite_total, kept) if is_ckpt else None)
    return metrics
