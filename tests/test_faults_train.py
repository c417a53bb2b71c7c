"""Reliability through Ray Train (issue 8, items 1 and 3): a killed Train worker costs at most
one epoch (the trial resumes from its last checkpoint), and non-finite losses under AMP are
skipped and counted, or stop the trial with a clear error, never saving NaN weights.
Bad inputs and interrupted writes: test_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import helpers_train
import pytest
import torch
from helpers_train import nan_worker

from geopose_ray.checkpoint import STATE_FILE, load_state

pytestmark = pytest.mark.fault  # `pytest -m fault` runs the whole reliability suite


# --- 1 and 3. a killed Train worker, and non-finite losses, through Ray Train ------------------
def _train_config(synthetic_dir: Path, tmp_path: Path, **flat) -> dict:
    return {
        "data_dir": str(synthetic_dir),
        "cache_dir": "",  # its default cache, converted by the fixture
        "n_folds": 3,
        "crop": 64,
        "val_crop": 64,
        "batch_size": 2,
        "val_batch_size": 4,
        "encoder": "resnet18",
        "encoder_weights": None,
        "photo_aug": "none",
        "schedule": "constant",
        "lr": 1e-3,
        "threads": 1,
        **flat,
    }


class ReportLog:
    """A Ray Train UserCallback (runs in the Train controller) that appends every registered
    report to a JSON-lines file: rank 0's epoch and counters, and whether it had a checkpoint."""

    def __init__(self, path: Path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        row = {k: metrics[0][k] for k in ("epoch", "nonfinite_steps", "nonfinite_total")}
        row.update(checkpoint=checkpoint is not None, time=time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _reports(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _train_worker_pids() -> set[int]:
    """PIDs of the live Train workers of this session's Ray instance. ray.init started it as
    our child, so its workers are our descendants (titled `ray::RayTrainWorker...`); no GCS or
    dashboard RPC, which timed out under load in CI, and no other cluster on the machine."""
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith("ray::RayTrainWorker") and proc.status() != psutil.STATUS_ZOMBIE:
            pids.add(proc.pid)
    return pids


def _kill_a_worker_after_first_checkpoint(log: Path, timeout: float = 240.0) -> dict:
    """Wait until the controller registered a checkpoint, then SIGKILL one Train worker."""
    deadline = time.monotonic() + timeout
    while not any(r["checkpoint"] for r in _reports(log)):
        assert time.monotonic() < deadline, "no checkpoint was registered in time"
        time.sleep(0.1)
    time.sleep(0.5)  # registered (the callback runs after registration); let the next epoch start
    before = _train_worker_pids()
    victim = min(before)
    reported = _reports(log)
    os.kill(victim, signal.SIGKILL)
    return {"victim": victim, "pids": before, "time": time.time(), "reported": reported}


@pytest.mark.ray
@pytest.mark.slow
def test_killed_train_worker_resumes_from_its_last_checkpoint(ray_session, synthetic_dir, tmp_path):
    """FailureConfig(max_failures=1): the worker group restarts from the last registered
    checkpoint and finishes every epoch; bf16 autocast with a NaN loss injected at step 0 shows
    the skipped step counted, and the count surviving the restart."""
    from ray import cloudpickle
    from ray.train import UserCallback

    from geopose_ray.tune.capacity import TrialResources
    from geopose_ray.tune.trainer import build_trainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    cloudpickle.register_pickle_by_value(helpers_train)
    log = tmp_path / "reports.jsonl"
    callback = type("ReportLogCallback", (ReportLog, UserCallback), {})(log)
    epochs = 3  # killed in epoch 2, resumed from the checkpoint of epoch 1, then epoch 3
    bf16 = {"precision": "bf16", "max_nonfinite": 2}
    # 48 tiles x 2 per epoch: ~24 steps per worker, long enough for the kill to land mid-epoch
    config = _train_config(
        synthetic_dir, tmp_path, epochs=epochs, repeat=2, max_train_samples=48, max_val_samples=8, **bf16
    )
    storage = tmp_path / "storage"
    trainer = build_trainer(
        config, name="fault-worker", storage_path=storage, resources=TrialResources(2, 1.0),
        num_to_keep=None, max_failures=1, callbacks=[callback], train_fn=nan_worker(0),
    )  # fmt: skip
    killed: dict = {}
    killer = threading.Thread(target=lambda: killed.update(_kill_a_worker_after_first_checkpoint(log)))
    killer.start()
    started, started_at = time.monotonic(), time.time()
    result = trainer.fit()
    killer.join(timeout=60)
    wall = time.monotonic() - started
    rows = _reports(log)
    assert killed, "the killer thread did not kill a worker"
    assert result.error is None
    after = [r for r in rows if r["time"] > killed["time"]]
    last_ckpt = max(r["epoch"] for r in killed["reported"] if r["checkpoint"])
    print(
        f"killed worker {killed['victim']} after epoch {last_ckpt:.0f}; epochs reported "
        f"{[int(r['epoch']) for r in rows]} at {[round(r['time'] - started_at) for r in rows]} s, "
        f"killed at {killed['time'] - started_at:.0f} s, {wall:.0f} s in all"
    )
    assert after and after[0]["epoch"] >= last_ckpt + 1  # resumed from the checkpoint, not epoch 0
    assert [r["epoch"] for r in after] == list(range(int(after[0]["epoch"]), epochs + 1))
    repeated = {r["epoch"] for r in killed["reported"]} & {r["epoch"] for r in after}
    assert len(repeated) <= 1  # at most one epoch trained twice
    assert not killed["pids"] & _train_worker_pids()  # the whole group was replaced
    assert rows[0]["nonfinite_steps"] == 1 and result.metrics["nonfinite_total"] == 1
    assert result.metrics["epoch"] == epochs
    for ckpt, _ in result.best_checkpoints:
        with ckpt.as_directory() as folder:
            state = load_state(folder)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.ray
@pytest.mark.slow
def test_repeated_nan_losses_stop_the_trial_with_a_clear_error(ray_session, synthetic_dir, tmp_path):
    from ray import cloudpickle

    from geopose_ray.tune.capacity import TrialResources
    from geopose_ray.tune.trainer import build_trainer

    cloudpickle.register_pickle_by_value(helpers_train)  # Ray workers cannot import tests/
    config = _train_config(synthetic_dir, tmp_path, epochs=2, precision="bf16", max_nonfinite=2)
    storage = tmp_path / "storage"
    trainer = build_trainer(
        config, name="fault-nan", storage_path=storage, resources=TrialResources(1, 1.0), max_failures=0,
        train_fn=nan_worker(0, 1),
    )  # fmt: skip
    with pytest.raises(Exception, match="NonFiniteLossError: 2 non-finite losses in a row") as e:
        trainer.fit()
    assert e.type.__name__ == "WorkerGroupError"  # a trial error, not a hang or a retry loop
    assert not list(storage.rglob(STATE_FILE))  # no checkpoint at all, so none holds NaN weights
