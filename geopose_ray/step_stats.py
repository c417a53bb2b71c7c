"""Device-side accounting and gating of the training step (`train_loop.train_one_epoch`).

Reading a GPU value on the host (`.item()`, `float(t)`, `bool(t)`) waits for every kernel queued
before it, so a per-micro-batch read stalls the stream once per step. Here the running sums, the
finite / non-finite counts and the non-finite streak stay on the device, and the loop reads them
in one `StepStats.sync` every `sync_every` micro-batches. A non-finite micro-batch is still kept
out of the weights without a read: its backward is masked and its gradients restored
(`masked_backward`), and a group whose last micro-batch is non-finite is skipped by a fused
optimizer's `found_inf` (`gated_step`) and a gated EMA update (`gated_ema_update`). `end_group`
ends an accumulation group: the optimizer step, the scheduler and the EMA, by gate. No `ray`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn

from geopose_ray.checkpoint import unwrap
from geopose_ray.optim import is_per_epoch


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def finite_flag(loss: torch.Tensor) -> torch.Tensor:
    """() bool on the loss's device: the loss is finite on every DDP rank (all-reduced MIN as a
    tensor, no host read), so all ranks take the same decision."""
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag[0] > 0


def gate_mode(sync_every: int, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> str:
    """Where a group's step / skip is decided. "host": every micro-batch's flag is read and a
    non-finite backward skipped (sync_every 1, the old loop). "device": a skipped group's step is
    cancelled on the device, which needs a fused optimizer (it takes `found_inf`) that undoes it
    exactly, and no GradScaler (whose step reads found_inf on the host). "group": otherwise, one
    host read per accumulation group decides its step."""
    if sync_every <= 1:
        return "host"
    fused = all(g.get("fused") for g in optimizer.param_groups)
    return "device" if fused and not scaler.is_enabled() and _skip_is_exact(optimizer) else "group"


def _skip_is_exact(optimizer: torch.optim.Optimizer) -> bool:
    """Fused Adam / AdamW undo a skipped step exactly. Fused SGD with momentum does not when the
    skipped step is its first: it allocates its momentum buffers uninitialised (torch.empty) and
    the next step reads them as if set (NaN weights in the tests), so it takes the "group" gate."""
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return True
    return isinstance(optimizer, torch.optim.SGD) and all(g["momentum"] == 0 for g in optimizer.param_groups)


@dataclass
class Totals:
    """The host copy of `StepStats` at a sync point."""

    sums: dict[str, float]  # train_<name> -> sum over finite micro-batches
    finite: int
    nonfinite: int
    hit: int  # global step at which the streak first reached the limit; -1 = never


class StepStats:
    """Running sums of one epoch as () float64 / int64 device tensors (float64 so the sums equal,
    bit for bit, the host float sums of the old loop)."""

    def __init__(self, device: torch.device, limit: int):
        self.limit = limit
        self.sums: dict[str, torch.Tensor] = {}  # train_<name> -> () float64
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)  # (finite, nonfinite)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)  # non-finite in a row
        self.hit = torch.full((), -1, dtype=torch.int64, device=device)  # global step, -1 = none

    @torch.no_grad()
    def add(self, step: int, loss: torch.Tensor, parts: dict[str, Any], finite: torch.Tensor) -> None:
        """Count micro-batch `step` (global); its loss and parts (tensors or floats) add to the
        sums only when `finite` (a () bool tensor)."""
        for k, v in {"loss": loss, **parts}.items():
            v = torch.as_tensor(v, device=self.counts.device).detach().to(torch.float64)
            total = self.sums.get(f"train_{k}", torch.zeros_like(self.counts[0]))
            self.sums[f"train_{k}"] = total + torch.where(finite, v, 0.0)
        self.counts += torch.stack([finite, ~finite]).to(torch.float64)
        self.streak = torch.where(finite, 0, self.streak + 1)
        reached = (self.hit < 0) & (self.streak >= self.limit)
        self.hit = torch.where(reached, step, self.hit)

    def sync(self) -> Totals:
        """One host read of everything (the only one between two sync points)."""
        keys = list(self.sums)
        flat = [self.counts, self.hit.to(torch.float64).reshape(1), *(self.sums[k].reshape(1) for k in keys)]
        values = torch.cat(flat).tolist()
        finite, nonfinite, hit = int(values[0]), int(values[1]), int(values[2])
        return Totals(dict(zip(keys, values[3:])) if finite else {}, finite, nonfinite, hit)


def masked_backward(
    loss: torch.Tensor,
    finite: torch.Tensor,
    scaler: torch.amp.GradScaler,
    group: int,
    keep: list[nn.Parameter] | None,
) -> None:
    """Backward of `loss / group` when `finite`, of 0 otherwise, without a host read. A NaN in the
    graph still makes the masked gradients NaN (0 * NaN), so for the non-last micro-batches of a
    group (`keep`, the parameters) the gradients from before are restored: one copy of the
    gradients per such micro-batch, only with grad_accum > 1. A non-finite LAST micro-batch
    leaves NaN gradients: its group is skipped (`gated_step`), as in the old loop."""
    saved = None if keep is None else [None if p.grad is None else p.grad.clone() for p in keep]
    scaler.scale(torch.where(finite, loss, 0.0) / group).backward()
    if saved is None:
        return
    with torch.no_grad():
        for p, before in zip(keep, saved):
            if p.grad is not None:
                p.grad.copy_(torch.where(finite, p.grad, 0.0 if before is None else before))


def backward(
    loss: torch.Tensor,
    finite: torch.Tensor,
    scaler: torch.amp.GradScaler,
    group: int,
    gate: str,
    keep: list | None,
) -> torch.Tensor | bool:
    """The micro-batch's backward; returns its finiteness: read on the host by the "host" gate,
    which skips a non-finite backward as the loop always did, and a device bool otherwise."""
    if gate == "host":
        finite = bool(finite.item())  # the one per-micro-batch sync of sync_every = 1
        if finite:
            scaler.scale(loss / group).backward()
        return finite
    masked_backward(loss, finite, scaler, group, keep)
    return finite


def gated_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """A fused optimizer's step that is a no-op on the device when not `ok` (() bool): weights,
    moments and step count unchanged (the `found_inf` that GradScaler passes to fused optimizers)."""
    optimizer.grad_scale, optimizer.found_inf = None, (~ok).to(torch.float32)
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None


@torch.no_grad()
def gated_ema_update(ema: ModelEmaV3, model: nn.Module, step: int, ok: torch.Tensor) -> None:
    """`ema.update(model, step)` when `ok`, else nothing, decided on the device: a lerp weight of
    exactly 0 leaves the average unchanged (the same lerp as timm's, so `ok` steps match it)."""
    weight = torch.where(ok, 1.0 - ema.get_decay(step), 0.0)  # () float32

    def tensors(module: nn.Module) -> list[torch.Tensor]:
        return list(module.parameters()) if ema.exclude_buffers else list(module.state_dict().values())

    for e, m in zip(tensors(ema.module), tensors(model)):
        m = m.to(e.device)
        if e.is_floating_point():
            e.lerp_(m, weight.to(e.dtype))
        else:
            e.copy_(torch.where(ok, m, e))


def optimizer_step(
    model: nn.Module, optimizer, scaler, grad_clip: float, ok: torch.Tensor | None = None
) -> None:
    """Unscale, clip and step; `ok` (() bool, "device" gate): a fused step cancelled on the device."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if ok is None:
        scaler.step(optimizer)
    else:
        gated_step(optimizer, ok)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def end_group(
    model: nn.Module, optimizer, scaler, scheduler: Any, ema: ModelEmaV3 | None, grad_clip: float,
    ok: torch.Tensor | bool, gate: str, ema_step: int,
) -> None:  # fmt: skip
    """An accumulation group ends; `ok`: its last micro-batch was finite (the syncing one, so the
    earlier ones' gradients are usable). "host" / "group" gates: step (and a per-step scheduler,
    the EMA) when `ok`, else drop the unsynchronised gradients. "device" gate: the optimizer step
    and the EMA update are cancelled on the device when not `ok`; the scheduler always steps."""
    if gate == "device":
        optimizer_step(model, optimizer, scaler, grad_clip, ok)
    elif bool(ok):  # "group": the one host read of the group
        optimizer_step(model, optimizer, scaler, grad_clip)
    else:
        optimizer.zero_grad(set_to_none=True)
        return
    if scheduler is not None and not is_per_epoch(scheduler):
        scheduler.step()
    if ema is not None and gate == "device":
        gated_ema_update(ema, unwrap(model), ema_step, ok)
    elif ema is not None:
        ema.update(unwrap(model), step=ema_step)
