"""Ray Train adapter: the per-worker function of a TorchTrainer (layer 3 of Ray's Train-in-Tune
shape, RAY_NOTES sections 1, 3 and 5) and a small factory for the trainer itself.

All the training lives in the Ray-free core (`train_loop.fit`); this file only connects it to
Ray: DDP wrapping via `prepare_model` / `prepare_data_loader` (gloo on CPU, NCCL on GPU, the
TorchTrainer default), per-epoch `ray.train.report` with a rank-0 checkpoint folder, and resume
from `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from geopose_ray.checkpoint import load_state, save_state
from geopose_ray.config import Config, key_owners
from geopose_ray.train_loop import fit

log = logging.getLogger(__name__)

# Checkpoints are ranked by the validation score (the official metric, higher is better).
SCORE_ATTRIBUTE, SCORE_ORDER = "score", "max"


def config_from_trial(config: dict[str, Any]) -> Config:
    """The run Config from a trial's flat dict. Keys that are not config keys (driver-level
    settings such as workers per trial travel in the same dict) are ignored with a log line;
    the search space itself is validated strictly when it is loaded."""
    extra = sorted(set(config) - set(key_owners()))
    if extra:
        log.info("ignoring non-config keys in the trial config: %s", extra)
    return Config.from_dict(config, strict=False)


def _report(rank: int, metrics: dict[str, float], state_fn: Callable[[], dict[str, Any]] | None) -> None:
    """Every rank reports (report is a barrier); only rank 0 attaches the checkpoint folder.
    `node_id` says where this worker ran (the driver's report callback collects it)."""
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    with tempfile.TemporaryDirectory(prefix="geopose-ckpt-") as tmp:
        checkpoint = None
        if rank == 0 and state_fn is not None:
            save_state(tmp, state_fn())  # state.pt + config.yaml
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Run `fit` on this Train worker; resumes from the run's latest registered checkpoint."""
    cfg = config_from_trial(config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    start_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_state = load_state(folder)
        log.info("rank %d resuming after epoch %d", rank, start_state["epoch"])
    fit(
        cfg,
        reporter=lambda metrics, state_fn: _report(rank, metrics, state_fn),
        start_state=start_state,
        wrap_model=ray.train.torch.prepare_model,
        wrap_loader=ray.train.torch.prepare_data_loader,
        rank=rank,
        world_size=world_size,
        device=ray.train.torch.get_device(),
    )


def make_trainer(
    config: dict[str, Any],
    *,
    name: str,
    storage_path: str | Path,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    num_to_keep: int | None = 2,
    max_failures: int = 0,
    callbacks: Sequence[Any] = (),
) -> TorchTrainer:
    """A TorchTrainer for one training run. `name` must be stable (no timestamps): a trainer
    with the same name and storage resumes that run from its latest checkpoint (RAY_NOTES 4)."""
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=dict(config),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=num_to_keep,
                checkpoint_score_attribute=SCORE_ATTRIBUTE,
                checkpoint_score_order=SCORE_ORDER,
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks),
        ),
    )
