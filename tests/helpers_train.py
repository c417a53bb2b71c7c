"""Training test hooks: the fault tests' NaN losses, passed to `fit(loss_hook=...)`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NanAt:
    """`loss_hook` of `fit` / `train_one_epoch`: the loss of these global steps (0-based) becomes
    NaN, as a diverged step would. Picklable, so it travels to Ray Train workers (register this
    module with `cloudpickle.register_pickle_by_value`: the workers cannot import tests/)."""

    steps: frozenset[int]

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.steps else loss


def nan_at(*steps: int) -> NanAt:
    return NanAt(frozenset(steps))


def nan_worker(*steps: int) -> Callable[[dict], None]:
    """The product's per-worker function with NaN losses at these global steps (`build_trainer`'s
    `train_fn`)."""
    from geopose_ray.tune.trainer import train_fn_per_worker

    return functools.partial(train_fn_per_worker, loss_hook=nan_at(*steps))
