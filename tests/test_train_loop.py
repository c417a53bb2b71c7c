"""Training core with small fakes: optimizer / schedule by name, accumulation, NaN guard, AMP
paths, validation sharding, checkpoint state round trips."""

from __future__ import annotations

import copy
import itertools
import math
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers_train import nan_at
from torch import nn

from geopose_ray.checkpoint import (
    STATE_FILE,
    NonFiniteWeightsError,
    load_state,
    make_state,
    restore_state,
    save_state,
    staging_dir,
)
from geopose_ray.config import Config, OptimConfig
from geopose_ray.errors import InputError
from geopose_ray.optim import build_optimizer, build_scheduler
from geopose_ray.train_loop import NonFiniteLossError, autocast_dtype, train_one_epoch

SIZE = 8  # px


class FakeModel(nn.Module):
    """The GeoposeModel output contract with a few parameters (conv, GroupNorm, linear)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.agl = nn.Conv2d(4, 1, 1)
        self.vec = nn.Linear(4, 3)

    def forward(self, image, gsd, city):
        f = torch.relu(self.norm(self.conv(image)))  # (B, 4, H, W)
        agl = self.agl(f) * gsd.view(-1, 1, 1, 1)  # (B, 1, H, W) m
        v = self.vec(f.mean((2, 3)))  # (B, 3)
        scale = nn.functional.softplus(v[:, :1])  # (B, 1) px/m
        return {"agl": agl, "mag": agl * scale.view(-1, 1, 1, 1), "scale": scale, "direction": v[:, 1:]}


def fake_criterion(pred, batch):
    valid = torch.isfinite(batch["agl"])
    agl = ((pred["agl"] - batch["agl"].nan_to_num())[valid] ** 2).mean()
    direction = ((pred["direction"] - batch["direction"]) ** 2).mean()
    scale = ((pred["scale"][:, 0] - batch["scale"]) ** 2).mean()
    return agl + direction + scale, {"agl": agl.detach(), "dir": direction.detach()}


def fake_items(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        angle = float(torch.rand(1, generator=g)) * 2 * math.pi
        agl = torch.rand(1, SIZE, SIZE, generator=g) * 20
        agl[0, 0, 0] = float("nan")
        items.append(
            {
                "image": torch.rand(3, SIZE, SIZE, generator=g),
                "agl": agl,
                "mag": agl * 2.0,
                "scale": torch.tensor(2.0),
                "direction": torch.tensor([math.sin(angle), math.cos(angle)]),
                "gsd": torch.tensor(0.5),
                "city": torch.tensor(i % 4),
                "id": f"T{i}",
            }
        )
    return items


def loader(items, batch_size):
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False)


def cfg_with(**flat) -> Config:
    base = {
        "precision": "fp32",
        "grad_clip": 0.0,
        "schedule": "constant",
        "optimizer": "sgd",
        "momentum": 0.0,
    }
    return Config.from_dict({**base, **flat})


def run_epoch(model, items, cfg: Config, batch_size=2, step_offset=0, loss_hook=None):
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch=len(items), epochs=1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    dl = loader(items, batch_size)
    return train_one_epoch(
        model, dl, fake_criterion, opt, sched, scaler, torch.device("cpu"), cfg, step_offset, loss_hook
    )


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# --- optimizer and schedule ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_optimizer_by_name_skips_decay_on_norms_and_biases(name, cls):
    model = FakeModel()
    opt = build_optimizer(model, OptimConfig(optimizer=name, lr=3e-3, weight_decay=0.1))
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.conv.weight), id(model.agl.weight), id(model.vec.weight)}
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


def test_unknown_optimizer_and_schedule_name_the_valid_ones():
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(FakeModel(), OptimConfig(optimizer="lion"))
    opt = build_optimizer(FakeModel(), OptimConfig())
    with pytest.raises(ValueError, match="cosine"):
        build_scheduler(opt, OptimConfig(schedule="poly"), 10, 2)


def _lrs(cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> list[float]:
    opt = build_optimizer(FakeModel(), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    lrs = _lrs(OptimConfig(lr=1e-2, schedule="cosine", warmup_epochs=1, min_lr_ratio=0.1), 10, 3)
    assert lrs[0] == pytest.approx(1e-3)  # step 1 of 10 warm-up steps
    assert lrs[9] == pytest.approx(1e-2)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))  # rising during warm-up
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # then never rising
    assert lrs[-1] == pytest.approx(1e-3, rel=0.1)  # near min_lr_ratio * lr on the last step


def test_onecycle_peaks_at_lr_and_constant_stays():
    lrs = _lrs(OptimConfig(lr=1e-2, schedule="onecycle"), 5, 4)
    assert max(lrs) == pytest.approx(1e-2, rel=0.02)
    assert lrs[0] < 1e-3 and lrs[-1] < 1e-3
    assert set(_lrs(OptimConfig(lr=1e-2, schedule="constant"), 3, 2)) == {1e-2}


def test_plateau_halves_the_lr_when_the_score_stalls():
    cfg = OptimConfig(lr=1e-2, schedule="plateau")
    opt = build_optimizer(FakeModel(), cfg)
    sched = build_scheduler(opt, cfg, 10, 20)
    for score in [0.1, 0.2, 0.3]:
        sched.step(score)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    for _ in range(4):
        sched.step(0.3)
    assert opt.param_groups[0]["lr"] < 1e-2


# --- one epoch ----------------------------------------------------------------------------------
def test_grad_accumulation_matches_one_big_batch():
    items = fake_items(8)
    big = FakeModel()
    small = copy.deepcopy(big)
    run_epoch(big, items, cfg_with(lr=0.05, grad_accum=1), batch_size=4)
    run_epoch(small, items, cfg_with(lr=0.05, grad_accum=2), batch_size=2)
    for a, b in zip(params(big), params(small)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # without accumulation, batch 2 takes twice as many steps: the weights differ
    base = FakeModel()
    other = copy.deepcopy(base)
    run_epoch(base, items, cfg_with(lr=0.05, grad_accum=1), batch_size=4)
    run_epoch(other, items, cfg_with(lr=0.05, grad_accum=1), batch_size=2)
    assert any(not torch.allclose(a, b) for a, b in zip(params(base), params(other)))


def test_training_lowers_the_loss_and_reports_flat_metrics():
    torch.manual_seed(0)
    model, items = FakeModel(), fake_items(8)
    cfg = cfg_with(optimizer="adamw", lr=0.02, grad_clip=1.0)
    first = run_epoch(model, items, cfg)
    for _ in range(5):
        last = run_epoch(model, items, cfg)
    assert last["train_loss"] < first["train_loss"]
    assert {
        "train_loss",
        "train_agl",
        "train_dir",
        "lr",
        "nonfinite_steps",
        "imgs_per_s",
        "epoch_time_s",
    } <= set(last)
    assert all(isinstance(v, float) and math.isfinite(v) for v in last.values())
    assert last["nonfinite_steps"] == 0


def test_nan_steps_are_skipped_and_counted():
    items = fake_items(8)  # 4 batches of 2
    model = FakeModel()
    before = params(model)
    m = run_epoch(model, items, cfg_with(lr=0.05, max_nonfinite=5), loss_hook=nan_at(0, 1, 2, 3))
    assert m["nonfinite_steps"] == 4 and math.isnan(m["train_loss"])
    for a, b in zip(before, params(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # no step was taken

    model = FakeModel()
    cfg = cfg_with(lr=0.05, max_nonfinite=5)
    m = run_epoch(model, items, cfg, step_offset=4, loss_hook=nan_at(5, 6))
    assert m["nonfinite_steps"] == 2 and math.isfinite(m["train_loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_nan_losses_in_a_row_stop_the_run():
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        run_epoch(FakeModel(), fake_items(8), cfg_with(max_nonfinite=3), loss_hook=nan_at(1, 2, 3))
    # the same number of NaN losses, not in a row, does not stop it
    m = run_epoch(FakeModel(), fake_items(12), cfg_with(max_nonfinite=2), loss_hook=nan_at(0, 2, 4))
    assert m["nonfinite_steps"] == 3


@pytest.mark.parametrize("precision", ["fp16", "bf16", "auto", "fp32"])
def test_precisions_run_on_cpu_without_a_scaler(precision):
    dtype, needs_scaler = autocast_dtype(precision, torch.device("cpu"))
    assert not needs_scaler  # GradScaler is CUDA-only
    assert dtype in (None, torch.bfloat16)
    assert autocast_dtype(precision, torch.device("cuda"))[1] == (precision == "fp16")
    scaler = torch.amp.GradScaler("cpu", enabled=needs_scaler)
    assert not scaler.is_enabled()
    m = run_epoch(FakeModel(), fake_items(4), cfg_with(precision=precision, optimizer="adamw", grad_clip=1.0))
    assert math.isfinite(m["train_loss"]) and m["nonfinite_steps"] == 0


def test_channels_last_trains():
    model = FakeModel().to(memory_format=torch.channels_last)
    m = run_epoch(model, fake_items(4), cfg_with(channels_last=True))
    assert math.isfinite(m["train_loss"])


# --- checkpoint state ---------------------------------------------------------------------------
def _parts(cfg: Config, model: nn.Module, steps_per_epoch: int = 4):
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch, cfg.train.epochs)
    return opt, sched, torch.amp.GradScaler("cpu", enabled=False)


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_state_round_trip_resumes_with_identical_state(tmp_path):
    cfg = cfg_with(optimizer="adamw", schedule="cosine", lr=0.01, epochs=3, warmup_epochs=0.5)
    items = fake_items(8)
    model = FakeModel()
    opt, sched, scaler = _parts(cfg, model)
    dev = torch.device("cpu")
    train_one_epoch(model, loader(items, 2), fake_criterion, opt, sched, scaler, dev, cfg)
    save_state(tmp_path / "ck", make_state(model, opt, scaler, sched, 1, cfg))
    expected_draws = _draws()
    train_one_epoch(model, loader(items, 2), fake_criterion, opt, sched, scaler, dev, cfg, 4)
    expected = params(model)

    torch.manual_seed(123)  # disturb every RNG before resuming
    np.random.seed(123)
    random.seed(123)
    state = load_state(tmp_path / "ck")
    assert state["config"] == cfg.to_dict()
    model2 = FakeModel()
    opt2, sched2, scaler2 = _parts(Config.from_dict(state["config"]), model2)
    assert restore_state(state, model2, opt2, scaler2, sched2, cfg) == 1  # epochs completed
    assert sched2.last_epoch == 4  # optimizer steps taken before the checkpoint
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert _draws() == expected_draws
    restore_state(state, model2, opt2, scaler2, sched2, cfg)
    train_one_epoch(model2, loader(items, 2), fake_criterion, opt2, sched2, scaler2, dev, cfg, 4)
    for a, b in zip(expected, params(model2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sched2.last_epoch == sched.last_epoch == 8
    assert (tmp_path / "ck" / "config.yaml").is_file()


def test_state_is_a_snapshot_that_later_training_does_not_change():
    cfg = cfg_with(optimizer="adamw", lr=0.01)
    model, items = FakeModel(), fake_items(4)
    opt, sched, scaler = _parts(cfg, model)
    dev = torch.device("cpu")
    train_one_epoch(model, loader(items, 2), fake_criterion, opt, sched, scaler, dev, cfg)
    state = make_state(model, opt, scaler, sched, 1, cfg)
    saved = {k: v.clone() for k, v in state["model"].items()}
    moments = state["optimizer"]["state"][0]["exp_avg"].clone()
    train_one_epoch(model, loader(items, 2), fake_criterion, opt, sched, scaler, dev, cfg)
    for k, v in saved.items():
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0)
    torch.testing.assert_close(state["optimizer"]["state"][0]["exp_avg"], moments, rtol=0, atol=0)
    assert not torch.equal(state["model"]["conv.weight"], model.conv.weight.detach())


def test_non_finite_weights_are_never_saved(tmp_path):
    cfg = cfg_with()
    model = FakeModel()
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
    opt, sched, scaler = _parts(cfg, model)
    with pytest.raises(NonFiniteWeightsError, match=r"conv\.weight"):
        save_state(tmp_path / "ck", make_state(model, opt, scaler, sched, 1, cfg))
    assert not (tmp_path / "ck" / STATE_FILE).exists()


def test_missing_or_corrupt_state_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_state(tmp_path)
    (tmp_path / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot load"):
        load_state(tmp_path)


def test_a_staging_folder_is_removed_and_sweeps_those_of_killed_writers(tmp_path):
    """A worker killed mid-report leaves its staging folder behind: the next one removes it,
    but never a live process's folder, another host's, or a folder it did not name."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    host = socket.gethostname()
    orphan = tmp_path / f"geopose-ckpt-{dead.pid}@{host}@abc"
    live = tmp_path / f"geopose-ckpt-{os.getpid()}@{host}@def"
    other_host = tmp_path / f"geopose-ckpt-{dead.pid}@{host}-2@ghi"
    unnamed = tmp_path / "geopose-ckpt-jkl"
    for folder in (orphan, live, other_host, unnamed):
        folder.mkdir()
        (folder / STATE_FILE).write_bytes(b"weights")
    with staging_dir(tmp_path) as tmp:
        assert tmp.is_dir() and tmp.name.startswith(f"geopose-ckpt-{os.getpid()}@{host}@")
        (tmp / STATE_FILE).write_bytes(b"weights")
    assert not tmp.exists() and not orphan.exists()
    assert live.is_dir() and other_host.is_dir() and unnamed.is_dir()
