"""Search-space YAML: loading, validation, conditionals and defaults (fast, no Ray)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from geopose_ray.config import Config
from geopose_ray.errors import InputError
from geopose_ray.tune.space import SpaceSampler, load_space, parse_overrides

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))

GOOD = """
num_samples: 5
scheduler: {max_epochs: 4, grace_period: 1, reduction_factor: 2}
fixed: {crop: 64, optimizer: adamw}
parameters:
  encoder: {type: choice, values: [resnet18, efficientnet-b0], default: resnet18}
  agl_loss: {type: choice, values: [mse, huber, focal_mse], default: mse}
  huber_delta: {type: uniform, low: 1.0, high: 10.0, default: 5.0, when: {agl_loss: huber}}
  focal_beta: {type: uniform, low: 0.1, high: 0.4, default: 0.2, when: {agl_loss: [focal_mse]}}
  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2, default: 1.0e-3}
  batch_size: {type: int, low: 2, high: 8, step: 2, default: 4}
  decoder_channels: {type: choice, values: [0, 128], default: 0, when: {encoder: resnet18, optimizer: adamw}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_shipped_spaces_exist():
    names = {p.stem for p in SPACES}
    assert {"smoke", "baseline", "architectures", "losses", "finetune"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_space_loads_and_defaults_build_a_config(path: Path):
    space = load_space(path)
    cfg = Config.from_dict(space.defaults())
    assert cfg.train.epochs == space.scheduler.max_epochs
    for key, value in space.fixed.items():
        assert cfg.to_dict()[key] == value
    assert space.num_samples >= 1


@pytest.mark.parametrize(("tile", "disp"), [(64, 5.0), (128, 13.0), (256, 80.0), (2048, 600.0)])
def test_smoke_space_is_small_enough_for_cpu(tile, disp):
    from geopose_ray.data import derive
    from geopose_ray.data.stats import DataStats

    space = load_space(next(p for p in SPACES if p.stem == "smoke"))
    data = DataStats(train_tiles=100, measured=100, tile_px=tile, disp_p95=disp, disp_max=disp, built=0.2)
    cfg = Config.from_dict(space.with_data(data)[0].defaults())
    assert cfg.data.crop <= 256 and cfg.model.encoder_weights is None and cfg.train.threads == 1
    # a bounded number of training pixels per trial, whatever the data set's size
    pixels = cfg.data.epoch_samples * cfg.data.crop**2 * space.scheduler.max_epochs
    assert 0 < pixels <= 1.2 * derive.EPOCH_PX * space.scheduler.max_epochs


@pytest.mark.parametrize(("disp", "batch"), [(13.0, 16), (80.0, 4)])
def test_the_default_rate_follows_a_derived_batch_and_not_a_space_set_one(disp, batch):
    """Adam's square-root rule: a quarter of the batch, half the rate; the range stays searched."""
    from geopose_ray.data.stats import DataStats

    smoke = load_space(next(p for p in SPACES if p.stem == "smoke"))
    data = DataStats(train_tiles=100, measured=100, tile_px=256, disp_p95=disp, disp_max=disp, built=0.2)
    space, lines = smoke.with_data(data)
    assert space.defaults()["batch_size"] == batch and "lr" in space.searched()
    assert space.defaults()["lr"] == pytest.approx(smoke.defaults()["lr"] * (batch / 16) ** 0.5)
    assert any(line.startswith("lr") and "square-root" in line for line in lines)
    fixed_batch, _ = smoke.with_fixed({"batch_size": 4}).with_data(data)
    assert fixed_batch.defaults()["lr"] == smoke.defaults()["lr"]


def test_defaults_skip_inactive_conditionals(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    point = space.default_point()
    assert point == {
        "encoder": "resnet18",
        "agl_loss": "mse",
        "lr": 1e-3,
        "batch_size": 4,
        "decoder_channels": 0,
    }
    assert space.defaults() == {"crop": 64, "optimizer": "adamw", **point, "epochs": 4}


def test_conditionals_follow_the_chosen_values(tmp_path):
    sampler = SpaceSampler(load_space(write(tmp_path, GOOD)))
    base = {"encoder": "efficientnet-b0", "lr": 1e-3, "batch_size": 2}
    huber = optuna.trial.FixedTrial({**base, "agl_loss": "huber", "huber_delta": 2.0})
    returned = sampler(huber)
    assert huber.params == {**base, "agl_loss": "huber", "huber_delta": 2.0}
    assert returned == {"crop": 64, "optimizer": "adamw", "epochs": 4}
    mse = optuna.trial.FixedTrial({**base, "agl_loss": "mse", "huber_delta": 2.0, "decoder_channels": 128})
    sampler(mse)
    assert "huber_delta" not in mse.params and "decoder_channels" not in mse.params


def test_sampled_values_stay_in_range(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    study.optimize(lambda t: (space.sample(t), 0.0)[1], n_trials=40)
    seen_losses = set()
    for t in study.trials:
        p = t.params
        seen_losses.add(p["agl_loss"])
        assert 1e-4 <= p["lr"] <= 1e-2 and p["batch_size"] in (2, 4, 6, 8)
        assert ("huber_delta" in p) == (p["agl_loss"] == "huber")
        assert ("focal_beta" in p) == (p["agl_loss"] == "focal_mse")
        assert ("decoder_channels" in p) == (p["encoder"] == "resnet18")
        Config.from_dict({**space.fixed, **p})
    assert seen_losses == {"mse", "huber", "focal_mse"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("lr: {type: loguniform", "lrr: {type: loguniform"), "not a Config key"),
        (("default: 1.0e-3}", "}"), "missing 'default'"),
        (("type: loguniform", "type: gaussian"), "type must be one of"),
        (("default: 1.0e-3", "default: 0.5"), "outside"),
        (("default: 1.0e-3", "default: 1e-3"), "outside"),  # PyYAML: a string
        (("values: [mse, huber, focal_mse], default: mse", "values: [mse], default: l1"), "not one of"),
        (("low: 1.0e-4, high", "low: 0.0, high"), "log scale"),
        (("fixed: {crop: 64,", "fixed: {epochs: 3, crop: 64,"), "scheduler.max_epochs"),
        (("fixed: {crop: 64,", "fixed: {fold: 1, crop: 64,"), "set by the run"),
        (("fixed: {crop: 64,", "fixed: {precise_bn_every: 2, crop: 64,"), "scheduler.grace_period"),
        (("when: {agl_loss: huber}", "when: {lr: 0.1}"), "unknown key"),  # lr comes later
        (("when: {agl_loss: huber}", "when: {agl_loss: l1}"), "never takes"),
        (("num_samples: 5", "num_samples: 5\nsamples: 3"), "unknown key"),
        (("num_samples: 5", "num_samples: 0"), "positive integer"),
        (("max_epochs: 4, grace_period: 1", "max_epochs: 4, grace_period: 9"), "grace_period"),
        (("max_epochs: 4, grace_period: 1", "max_epochs: 4, after_signal: maybe, grace_period: 1"), "after_signal"),
        (("fixed: {crop: 64,", "fixed: {crop: many,"), "valid Config"),
    ],
)
def test_bad_space_raises_input_error_naming_the_file(tmp_path, edit, message):
    old, new = edit
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(InputError) as err:
        load_space(path)
    assert err.value.path == str(path)
    assert message in err.value.problem


def test_unreadable_space(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="cannot read"):
        load_space(write(tmp_path, "parameters: [unclosed"))
    with pytest.raises(InputError, match="mapping"):
        load_space(write(tmp_path, "- a list"))


def test_smoke_choices_give_every_parameter_a_gradient():
    """DDP (2 Train workers per trial) fails on parameters that get no gradient, e.g. the unused
    conv head of smp's own efficientnet-* encoders: every model the smoke search can build trains."""
    import torch

    from geopose_ray.models import build_model

    space = load_space(next(p for p in SPACES if p.stem == "smoke"))
    defaults = Config.from_dict(space.defaults()).to_dict()  # unsearched keys: Config's defaults
    choices = {"arch": [defaults["arch"]], "encoder": [defaults["encoder"]]}
    choices.update({p.name: p.values for p in space.parameters if p.name in choices})
    combos = {(e, defaults["arch"]) for e in choices["encoder"]} | {
        (defaults["encoder"], a) for a in choices["arch"]
    }
    for encoder, arch in sorted(combos):
        model = build_model(Config.from_dict({**defaults, "encoder": encoder, "arch": arch}).model)
        out = model(torch.rand(2, 3, 64, 64), torch.full((2,), 0.5), torch.zeros(2, dtype=torch.long))
        sum(v.float().sum() for v in out.values()).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"{encoder} + {arch}: no gradient for {unused[:3]}"


def test_set_overrides_fix_unsearched_keys_and_refuse_the_rest(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    pinned = space.with_fixed(parse_overrides(["crop=128", "init_checkpoint=/ckpt/stage1", "use_city=true"]))
    assert pinned.defaults()["crop"] == 128 and pinned.defaults()["use_city"] is True
    assert Config.from_dict(pinned.defaults()).model.init_checkpoint == "/ckpt/stage1"
    assert space.fixed["crop"] == 64  # the loaded space is unchanged
    for items, message in (
        (["lr=1e-3"], "searched"),  # a searched key: edit its range in the file
        (["learning_rate=1"], "not a Config key"),
        (["fold=2"], "set by the run"),
        (["crop=[1, 2]"], "valid Config"),
        (["crop"], "KEY=VALUE"),
        (["crop=[1"], "not valid YAML"),
    ):
        with pytest.raises(InputError, match=message):
            space.with_fixed(parse_overrides(items))
