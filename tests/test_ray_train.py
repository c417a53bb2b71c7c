"""The Ray Train adapter end to end: 2 DDP workers (gloo on CPU) train, report and checkpoint, and
a trainer with the same run name and storage resumes the run instead of starting over."""

from __future__ import annotations

import math
from pathlib import Path

import helpers_train
import pytest
from helpers_train import nan_worker

from geopose_ray.checkpoint import CONFIG_FILE, STATE_FILE, VAL_SCORE_FILE, load_state

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_workers_report_checkpoint_and_resume(ray_session, synthetic_dir, synthetic_cache, tmp_path):
    from ray import cloudpickle

    from geopose_ray.tune.capacity import TrialResources
    from geopose_ray.tune.trainer import build_trainer

    cloudpickle.register_pickle_by_value(helpers_train)  # Ray workers cannot import tests/

    config = {
        "data_dir": str(synthetic_dir),
        "cache_dir": str(synthetic_cache),
        "n_folds": 3,
        "crop": 64,
        "batch_size": 2,
        "max_train_samples": 4,  # 2 tiles per rank: one step per epoch
        "encoder": "resnet18",
        "lr": 1e-3,
        "epochs": 2,
        "workers_per_trial": 2,  # a driver-level key: ignored by the worker, not an error
    }
    storage = tmp_path / "storage"
    trainer_args = {
        "name": "train-test-resume",
        "storage_path": storage,
        "resources": TrialResources(workers_per_trial=2, cpus_per_worker=1.0),
        "num_to_keep": None,
        "max_failures": 0,
    }

    first = build_trainer(config, **trainer_args).fit()
    assert first.error is None
    assert first.metrics["epoch"] == 2 and math.isfinite(first.metrics["score"])
    assert first.metrics["node_id"] == ray_session.get_runtime_context().get_node_id()
    with first.checkpoint.as_directory() as folder:
        state = load_state(folder)
        assert sorted(p.name for p in Path(folder).iterdir()) == sorted(
            [CONFIG_FILE, STATE_FILE, VAL_SCORE_FILE]
        )
    assert state["epoch"] == 2 and state["config"]["epochs"] == 2
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped from DDP

    # Extended to 3 epochs under the same name: NaN losses at global steps 0 and 1 (epochs 1 and
    # 2) with max_nonfinite=1 would fail a run that started over; a resumed one starts at step 2.
    extended = {**config, "epochs": 3, "max_nonfinite": 1}
    second = build_trainer(extended, **trainer_args, train_fn=nan_worker(0, 1)).fit()
    assert second.error is None
    assert second.metrics["epoch"] == 3 and second.metrics["nonfinite_total"] == 0
    epochs = sorted(int(m["epoch"]) for _, m in second.best_checkpoints)
    assert epochs == [1, 2, 3]  # epochs 1 and 2 were not reported again
    with second.checkpoint.as_directory() as folder:
        assert load_state(folder)["epoch"] == 3
