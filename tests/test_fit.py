"""`fit` on the synthetic set (real data, model and loss): reports, checkpoints, exact resume,
folds, the NaN guard, and a second stage started from a first stage's weights."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_train import nan_at

from geopose_ray.checkpoint import (
    inference_weights,
    init_from_checkpoint,
    load_model_from_checkpoint,
    load_state,
    save_state,
)
from geopose_ray.config import Config
from geopose_ray.errors import InputError
from geopose_ray.train_loop import NonFiniteLossError


# --- fit on the synthetic set (real data, model, loss) ------------------------------------------
def synthetic_cfg(synthetic_dir, cache_dir, **flat) -> Config:
    base = {
        "data_dir": str(synthetic_dir),
        "cache_dir": str(cache_dir),
        "n_folds": 2,  # 2 places per city here: with 3 place folds, fold 0 would lack a city
        "crop": 64,
        "batch_size": 2,
        "max_train_samples": 4,
        "encoder": "resnet18",
        "lr": 1e-3,
        "epochs": 2,
        "seed": 3,
    }
    return Config.from_dict({**base, **flat})


class Recorder:
    """A reporter that keeps every metrics dict and every checkpoint state it is offered."""

    def __init__(self):
        self.metrics, self.states = [], {}

    def __call__(self, metrics, state_fn):
        self.metrics.append(metrics)
        if state_fn is not None:
            self.states[int(metrics["epoch"])] = state_fn()


@pytest.fixture(scope="module")
def two_epochs(synthetic_dir, synthetic_cache, tmp_path_factory):
    from geopose_ray.train_loop import fit

    cfg = synthetic_cfg(synthetic_dir, synthetic_cache)
    rec = Recorder()
    last = fit(cfg, reporter=rec)
    return cfg, rec, last


def test_fit_reports_every_epoch_with_a_finite_score(two_epochs):
    cfg, rec, last = two_epochs
    assert [m["epoch"] for m in rec.metrics] == [1.0, 2.0]
    assert last == rec.metrics[-1]
    for m in rec.metrics:
        for key in ("score", "val_loss", "train_loss", "agl_r2", "vflow_r2", "score_ARG", "lr"):
            assert math.isfinite(m[key]), key
        assert m["nonfinite_steps"] == 0 and m["nonfinite_total"] == 0
    assert sorted(rec.states) == [1, 2]
    assert rec.states[2]["config"] == cfg.to_dict() and rec.states[2]["epoch"] == 2


def test_the_last_epoch_is_also_scored_through_the_products_views(two_epochs):
    """score_tta (D4 by default) only after the last epoch: the figure the ensemble delivers,
    beside the single-view score ASHA compares; the kept out-of-fold sums stay the single view's."""
    from geopose_ray.metrics import GeoposeScore

    _, rec, last = two_epochs
    assert "score_tta" not in rec.metrics[0]
    assert math.isfinite(last["score_tta"]) and last["score_tta"] != last["score"]
    assert 0.0 <= last["angle_err_deg_tta"] <= 180.0
    kept = GeoposeScore.from_array(rec.states[2]["val_score"]).compute()["final_present"]
    assert kept == pytest.approx(last["score"])


def test_fit_resumes_at_the_next_epoch_as_if_never_stopped(two_epochs, tmp_path):
    from geopose_ray.train_loop import fit

    cfg, rec, _ = two_epochs
    save_state(tmp_path, rec.states[1])
    resumed = Recorder()
    fit(cfg, reporter=resumed, start_state=load_state(tmp_path))
    assert [m["epoch"] for m in resumed.metrics] == [2.0]  # epoch 1 is not trained again
    for part in ("model", "ema"):  # the moving average continues too
        for key, value in rec.states[2][part].items():
            torch.testing.assert_close(resumed.states[2][part][key], value, msg=f"{part} {key}")
    assert resumed.metrics[0]["score"] == pytest.approx(rec.metrics[1]["score"], rel=1e-5)


def test_the_checkpoint_predicts_with_the_weights_moving_average(two_epochs, tmp_path):
    from geopose_ray.train_loop import fit

    cfg, rec, _ = two_epochs
    state = rec.states[2]
    raw, ema = state["model"], state["ema"]
    assert raw.keys() == ema.keys()
    moved = [k for k, v in raw.items() if v.is_floating_point() and not torch.equal(v, ema[k])]
    assert len(moved) > len(raw) // 2  # the average lags the raw weights
    save_state(tmp_path / "ckpt", state)
    model, _ = load_model_from_checkpoint(tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ema[key], rtol=0, atol=0, msg=key)
    off = Recorder()
    fit(cfg.replace(epochs=1, ema_decay=0.0), reporter=off)
    assert "ema" not in off.states[1] and inference_weights(off.states[1]) is off.states[1]["model"]


def test_folds_follow_fold_seed_not_the_training_seed(synthetic_dir, synthetic_cache, tmp_path):
    from geopose_ray.data.folds import make_folds
    from geopose_ray.data.loaders import split_samples

    cfg = synthetic_cfg(synthetic_dir, synthetic_cache, fold=1, max_train_samples=0, n_folds=3)
    train, val = split_samples(cfg)
    expected = make_folds(train + val, 3, cfg.data.fold_seed, cfg.data.fold_mode)
    assert {s.id for s in val} == {i for i, f in expected.items() if f == 1}
    assert not {s.id for s in train} & {s.id for s in val}
    assert split_samples(cfg.replace(seed=99))[1] == val
    assert {s.id for s in split_samples(cfg.replace(fold_seed=5))[1]} != {s.id for s in val}
    with pytest.raises(InputError, match="n_folds"):
        split_samples(cfg.replace(n_folds=99))
    with pytest.raises(InputError, match="fold 3 of 3"):
        split_samples(cfg.replace(fold=3))


def test_fit_stops_on_repeated_nan_without_a_checkpoint(synthetic_dir, synthetic_cache, tmp_path):
    from geopose_ray.train_loop import fit

    cfg = synthetic_cfg(synthetic_dir, synthetic_cache, max_nonfinite=2)
    rec = Recorder()
    with pytest.raises(NonFiniteLossError):
        fit(cfg, reporter=rec, loss_hook=nan_at(0, 1))
    assert rec.metrics == [] and rec.states == {}


# --- a second stage: init_checkpoint ------------------------------------------------------------
def test_init_checkpoint_loads_every_weight_and_refuses_another_architecture(two_epochs, tmp_path):
    from geopose_ray.models import build_model

    cfg, rec, _ = two_epochs
    save_state(tmp_path / "stage1", rec.states[2])
    model = build_model(cfg.model)
    init_from_checkpoint(model, tmp_path / "stage1")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, inference_weights(rec.states[2])[key], msg=key)
    with pytest.raises(InputError, match="does not fit this model") as err:
        init_from_checkpoint(build_model(cfg.replace(arch="FPN").model), tmp_path / "stage1")
    assert str(tmp_path / "stage1") in str(err.value)
    with pytest.raises(InputError, match="not found"):
        init_from_checkpoint(model, tmp_path / "missing")


def test_a_second_stage_starts_from_the_first_stages_weights(two_epochs, tmp_path):
    """lr 1e-12: stage 2's weights after an epoch are stage 1's (to 1e-5); a fresh start is not
    (stage 1 moved them by ~3e-3 from the seeded init)."""
    from geopose_ray.train_loop import fit

    cfg, rec, _ = two_epochs
    save_state(tmp_path / "stage1", rec.states[2])
    stage1 = inference_weights(rec.states[2])  # a second stage starts from the averaged weights
    frozen = {"epochs": 1, "lr": 1e-12, "schedule": "constant", "weight_decay": 0.0}

    def params_after(**flat) -> dict[str, torch.Tensor]:
        out = Recorder()
        fit(cfg.replace(**frozen, **flat), reporter=out)
        return {
            k: v for k, v in out.states[1]["model"].items() if v.is_floating_point() and "running_" not in k
        }

    stage2 = params_after(init_checkpoint=str(tmp_path / "stage1"))
    for key, value in stage2.items():
        torch.testing.assert_close(value, stage1[key], atol=1e-5, rtol=0, msg=key)
    fresh = params_after()
    assert max((fresh[k] - stage1[k]).abs().max().item() for k in fresh) > 1e-3  # 100x the tolerance


def test_a_search_checks_its_init_checkpoint_before_any_trial(two_epochs, tmp_path):
    from geopose_ray.checkpoint import check_init_checkpoint

    cfg, rec, _ = two_epochs
    save_state(tmp_path / "stage1", rec.states[2])
    check_init_checkpoint(tmp_path / "stage1", {**cfg.to_dict(), "crop": 128, "lr": 1e-5})  # fits
    with pytest.raises(InputError, match=r"arch='Unet' \(config: 'FPN'\)") as err:
        check_init_checkpoint(tmp_path / "stage1", {**cfg.to_dict(), "arch": "FPN"})
    assert str(tmp_path / "stage1") in str(err.value)
    with pytest.raises(InputError, match="not found"):
        check_init_checkpoint(tmp_path / "nothing", cfg.to_dict())


def test_checkpoints_keep_their_folds_metric_accumulators(two_epochs, tmp_path):
    """The validation fold's GeoposeScore sums at each checkpoint, beside state.pt: they give that
    epoch's score exactly, and summed over folds the pooled out-of-fold score (tune/refit.py)."""
    import numpy as np

    from geopose_ray.checkpoint import VAL_SCORE_FILE
    from geopose_ray.metrics import GeoposeScore

    _, rec, _ = two_epochs
    for epoch, metrics in zip((1, 2), rec.metrics, strict=True):
        save_state(tmp_path / str(epoch), rec.states[epoch])
        sums = np.load(tmp_path / str(epoch) / VAL_SCORE_FILE)
        assert sums.shape == GeoposeScore().to_array().shape
        assert GeoposeScore.from_array(sums).compute()["final_present"] == pytest.approx(metrics["score"])
        np.testing.assert_array_equal(load_state(tmp_path / str(epoch))["val_score"].numpy(), sums)


def test_statistics_re_measured_mid_run_change_the_scores_not_the_weights(two_epochs):
    """`precise_bn_every`: the epoch-1 checkpoint and score carry statistics re-measured on whole
    tiles (what ASHA's rung then compares), while the weights trained, and so the last epoch, are
    those of a run that re-measures only after the last epoch."""
    from geopose_ray.train_loop import fit

    cfg, rec, _ = two_epochs
    every = Recorder()
    fit(cfg.replace(precise_bn_every=1), reporter=every)
    norms = [k for k in rec.states[1]["ema"] if k.endswith("running_var")]
    assert norms
    changed = [k for k in norms if not torch.equal(every.states[1]["ema"][k], rec.states[1]["ema"][k])]
    assert len(changed) == len(norms)  # epoch 1: every norm re-measured
    assert every.metrics[0]["score"] != pytest.approx(rec.metrics[0]["score"], abs=1e-6)
    for part in ("model", "ema"):
        for key, value in rec.states[2][part].items():
            torch.testing.assert_close(every.states[2][part][key], value, msg=f"{part} {key}")
    assert every.metrics[1]["score"] == pytest.approx(rec.metrics[1]["score"], rel=1e-5)
    with pytest.raises(ValueError, match="precise_bn_every"):
        cfg.replace(precise_bn_every=-1)


def test_epochs_between_validations_repeat_the_figures_and_keep_no_checkpoint(two_epochs):
    """`val_every`: the first, every N-th and the last epoch are validated, and only those are
    checkpointed, so a checkpoint's score is its own weights' (the search sets N to ASHA's grace
    period); the weights trained are those of a run that validates every epoch."""
    from geopose_ray.train_loop import fit

    cfg, _, _ = two_epochs
    spaced = Recorder()
    fit(cfg.replace(epochs=4, val_every=3), reporter=spaced)
    assert [m["epoch"] for m in spaced.metrics] == [1.0, 2.0, 3.0, 4.0]
    assert sorted(spaced.states) == [1, 3, 4]
    assert spaced.metrics[1]["score"] == spaced.metrics[0]["score"]  # epoch 2 repeats epoch 1's
    assert spaced.metrics[2]["score"] != spaced.metrics[1]["score"]
    every = Recorder()
    fit(cfg.replace(epochs=4), reporter=every)
    for key, value in every.states[4]["model"].items():
        torch.testing.assert_close(spaced.states[4]["model"][key], value, msg=key)
    assert spaced.metrics[-1]["score"] == pytest.approx(every.metrics[-1]["score"], rel=1e-5)
