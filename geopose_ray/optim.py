"""Optimizer and learning-rate schedule by name (the training core's, `train_loop.fit`). No `ray`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from geopose_ray.config import OptimConfig

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "plateau", "onecycle", "constant")


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """Optimizer by name; weight decay only on weight matrices / kernels, never on norms or biases.
    `fused`: torch's fused kernels, whose step a device tensor can cancel (`step_stats.gated_step`,
    so a skipped step needs no host sync); the default foreach ones are not bit-identical to them."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=fused or None)
    if cfg.optimizer == "sgd":
        momentum, nesterov = cfg.momentum, cfg.momentum > 0
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=nesterov, fused=fused or None)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: {OPTIMIZERS}")


def _cosine_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine from 1 down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    """Schedule by name. `plateau` steps once per epoch on the validation score (mode max); every
    other schedule steps once per optimizer step (`steps_per_epoch` = optimizer steps)."""
    sched = torch.optim.lr_scheduler
    total = max(1, steps_per_epoch * epochs)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return sched.LambdaLR(optimizer, lambda s: _cosine_factor(s, warmup, total, cfg.min_lr_ratio))
    if cfg.schedule == "constant":
        return sched.LambdaLR(optimizer, lambda s: 1.0)
    if cfg.schedule == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if cfg.schedule == "onecycle":
        pct = min(0.5, warmup / total) if warmup > 0 else 0.3
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=pct)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; known: {SCHEDULES}")


def is_per_epoch(scheduler: Any) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
