"""Host syncs of the training loop (`train.sync_every`): the sums, counts and non-finite streak
stay on the device and are read every sync_every micro-batches, with the same counts, losses,
weights and error step as the old read-every-step loop (pinned here by a copy of it)."""

from __future__ import annotations

import copy
import math
import re
from collections import defaultdict

import pytest
import torch
from helpers_train import nan_at
from test_train_loop import FakeModel, cfg_with, fake_criterion, fake_items, loader, params

from geopose_ray.config import Config
from geopose_ray.optim import build_optimizer, build_scheduler
from geopose_ray.train_loop import NonFiniteLossError, build_ema, train_one_epoch

CPU = torch.device("cpu")


def run(model, items, cfg: Config, fused=True, loss_hook=None, step_offset=0, ema=None):
    """One epoch (batches of 2); returns (metrics, optimizer, scheduler)."""
    opt = build_optimizer(model, cfg.optim, fused=fused)
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch=len(items), epochs=1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    dl = loader(items, 2)
    m = train_one_epoch(model, dl, fake_criterion, opt, sched, scaler, CPU, cfg, step_offset, loss_hook, ema)
    return m, opt, sched


def reference_epoch(model, items, cfg: Config, fused: bool, loss_hook, ema=None) -> dict[str, float]:
    """The loop before sync_every (commit 16f15a1), CPU and one process: a host read of every
    loss, a skipped backward for a non-finite one, a group step only when its last was finite."""
    opt = build_optimizer(model, cfg.optim, fused=fused)
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch=len(items), epochs=1)
    accum, batches = cfg.optim.grad_accum, list(loader(items, 2))
    n, sums, finite_steps, nonfinite = len(batches), defaultdict(float), 0, 0
    for i, batch in enumerate(batches):
        group = min(accum, n - (i - i % accum))
        loss, parts = fake_criterion(model(batch["image"], batch["gsd"], batch["city"]), batch)
        loss = loss_hook(i, loss.float())
        finite = bool(torch.isfinite(loss).item())
        if finite:
            (loss / group).backward()
            finite_steps += 1
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[f"train_{k}"] += float(v)
        else:
            nonfinite += 1
        if i % accum == group - 1:
            if finite:
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update(model, step=i // accum + 1)
            opt.zero_grad(set_to_none=True)
    return {"train_loss": math.nan, **{k: v / max(1, finite_steps) for k, v in sums.items()}} | {
        "nonfinite_steps": float(nonfinite)
    }


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


NAN_STEPS = (1, 2, 5, 9)  # 1, 5, 9: last of a group of 2; 2: first of one (its gradient is restored)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize(("sync_every", "fused"), [(1, True), (4, True), (4, False), (16, True)])
def test_every_sync_setting_matches_the_old_loop_bit_for_bit(optimizer, grad_accum, sync_every, fused):
    """Isolated NaN micro-batches, a constant lr: counts, losses, weights and the EMA are the old
    loop's exactly, whether the skip is decided on the host or on the device (fused)."""
    flat = dict(optimizer=optimizer, lr=0.05, momentum=0.5, weight_decay=0.1, grad_clip=1.0)
    cfg = cfg_with(**flat, grad_accum=grad_accum, sync_every=sync_every, max_nonfinite=3)
    items, base = fake_items(24), FakeModel()  # 12 micro-batches
    ref_model, model = copy.deepcopy(base), copy.deepcopy(base)
    ref_ema, ema = build_ema(ref_model, cfg), build_ema(model, cfg)
    expected = reference_epoch(ref_model, items, cfg, fused, nan_at(*NAN_STEPS), ref_ema)
    got, _, _ = run(model, items, cfg, fused, nan_at(*NAN_STEPS), ema=ema)
    assert got["nonfinite_steps"] == expected["nonfinite_steps"] == len(NAN_STEPS)
    assert {k: got[k] for k in expected} == expected  # the float64 sums, exactly
    _same(params(model), params(ref_model))
    _same(params(ema.module), params(ref_ema.module))
    assert any(not torch.equal(a, b) for a, b in zip(params(model), params(base)))  # it trained


def test_all_nan_groups_leave_weights_and_adamw_moments_untouched_on_the_device():
    cfg = cfg_with(optimizer="adamw", lr=0.05, sync_every=8)
    model = FakeModel()
    before = params(model)
    m, opt, _ = run(model, fake_items(8), cfg, loss_hook=nan_at(0, 1, 2, 3))
    assert m["nonfinite_steps"] == 4 and math.isnan(m["train_loss"]) and set(m) >= {"lr", "imgs_per_s"}
    _same(params(model), before)
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())


def test_the_device_gate_still_steps_the_scheduler_on_a_skipped_group():
    """The one documented difference: a per-step schedule counts the skipped group."""
    cfg1 = cfg_with(schedule="cosine", sync_every=1)
    _, _, host = run(FakeModel(), fake_items(8), cfg1, loss_hook=nan_at(1))
    _, _, device = run(FakeModel(), fake_items(8), cfg1.replace(sync_every=4), loss_hook=nan_at(1))
    assert (host.last_epoch, device.last_epoch) == (3, 4)


@pytest.mark.parametrize("sync_every", [1, 4, 5])
@pytest.mark.parametrize("nans", [(11, 12, 13), (11, 12, 13, 14, 15)])
def test_a_streak_names_the_step_where_it_reached_the_limit(sync_every, nans):
    """Steps 10..17, sync points after 13 and 17 (sync_every 4) or 14 and 17 (5): the streak
    reaches 3 at step 13 in both cases, and goes on, or not, before the read."""
    cfg = cfg_with(max_nonfinite=3, sync_every=sync_every)
    message = re.escape("3 non-finite losses in a row (global step 13); lower the lr")
    with pytest.raises(NonFiniteLossError, match=message):
        run(FakeModel(), fake_items(16), cfg, loss_hook=nan_at(*nans), step_offset=10)
    m, _, _ = run(FakeModel(), fake_items(16), cfg, loss_hook=nan_at(11, 12, 14, 15), step_offset=10)
    assert m["nonfinite_steps"] == 4  # two streaks of 2: no error


def _count_host_reads(monkeypatch) -> dict[str, int]:
    """Counts the Tensor methods that copy a value to the host (each waits for the device)."""
    calls = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            calls["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize(
    ("sync_every", "optimizer", "fused", "grad_accum"),
    [(1, "adamw", True, 1), (8, "adamw", True, 1), (8, "sgd", True, 4), (8, "sgd", False, 4)],
)
def test_host_reads_fall_with_sync_every(monkeypatch, sync_every, optimizer, fused, grad_accum):
    """(Foreach Adam reads its CPU step counts with .item(), which waits for nothing: SGD here.)"""
    steps = 32
    flat = dict(optimizer=optimizer, momentum=0.9, grad_clip=1.0)
    cfg = cfg_with(**flat, sync_every=sync_every, grad_accum=grad_accum)
    model, items = FakeModel(), fake_items(2 * steps)
    calls = _count_host_reads(monkeypatch)
    m, _, _ = run(model, items, cfg, fused, loss_hook=nan_at(3, 17))
    monkeypatch.undo()
    assert m["nonfinite_steps"] == 2
    syncs = math.ceil(steps / sync_every)
    if sync_every == 1:
        assert calls["n"] >= steps
    elif optimizer == "adamw":  # "device" gate: only the sync points
        assert calls["n"] <= syncs + 1
    else:  # "group" gate (SGD with momentum, fused or not): one read per group as well
        assert calls["n"] <= syncs + steps // grad_accum + 1
