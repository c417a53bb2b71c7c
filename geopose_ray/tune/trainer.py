"""Ray Train: the one TorchTrainer factory, the per-worker function, and a Tune trial's driver.

Ray's three-layer shape (docs/LIBRARIES.md, 'Ray: Train inside Tune'): the Tuner (`tuner.py`) runs one driver
function per trial (`train_driver_fn`), which fits a `TorchTrainer` built by `build_trainer`,
whose workers run `train_fn_per_worker`. All the training lives in the Ray-free core
(`train_loop.fit`); this file only connects it to Ray: DDP wrapping via `prepare_model` /
`prepare_data_loader` (gloo on CPU, NCCL on GPU), per-epoch `ray.train.report` with a rank-0
checkpoint folder, resume from `ray.train.get_checkpoint()`, and rank 0's metrics forwarded to
Tune by `TuneReportCallback`. Search trials, refits and the tests all build their trainer here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from geopose_ray import ray_env, storage
from geopose_ray.checkpoint import load_state, save_state, staging_dir
from geopose_ray.config import Config
from geopose_ray.experiment import METRIC, MODE, train_run_name, trial_train_config
from geopose_ray.tune.capacity import DRIVER_CPUS, TrialResources

if TYPE_CHECKING:
    from geopose_ray.train_loop import LossHook

log = logging.getLogger(__name__)
WorkerFn = Callable[[dict[str, Any]], None]


# --- layer 3: every Train worker --------------------------------------------------------------
def config_from_trial(config: dict[str, Any]) -> Config:
    """The run Config from a trial's flat dict. Keys that are not config keys (driver-level
    settings such as workers per trial travel in the same dict) are dropped by
    `experiment.trial_train_config`, the one filter; the search space itself is validated
    strictly when it is loaded."""
    return Config.from_dict(trial_train_config(config))


def _report(rank: int, metrics: dict[str, float], state_fn: Callable[[], dict[str, Any]] | None) -> None:
    """Every rank reports (report is a barrier); only rank 0 attaches the checkpoint folder.
    `node_id` says where this worker ran (the driver's report callback collects it)."""
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    if rank != 0 or state_fn is None:
        ray.train.report(metrics)
        return
    with staging_dir() as tmp:
        save_state(tmp, state_fn())  # state.pt + config.yaml
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def train_fn_per_worker(config: dict[str, Any], loss_hook: LossHook | None = None) -> None:
    """Run `fit` on this Train worker; resumes from the run's latest registered checkpoint.
    `loss_hook`: see `train_loop.train_one_epoch` (the fault tests pass one with `partial`)."""
    # imported here, not at the top: a trial's driver and Train's controller actor unpickle
    # functions of this module too, and never train: importing the training stack (timm,
    # albumentations, the data layer) at the top would double their start-up, while the worker
    # pays the same import here instead (docs/BENCHMARKS.md, 'Figures moved from code comments').
    from geopose_ray.train_loop import fit

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
        loss_hook=loss_hook,
    )


# --- the one trainer factory ------------------------------------------------------------------
def build_trainer(
    config: dict[str, Any],
    *,
    name: str,
    storage_path: str | Path,
    resources: TrialResources,
    num_to_keep: int | None = 2,
    max_failures: int = 1,
    controller_failure_limit: int = -1,
    callbacks: Sequence[Any] = (),
    train_fn: WorkerFn | None = None,
) -> TorchTrainer:
    """The TorchTrainer of one training run. `name` must be stable (no timestamps): a trainer with
    the same name and storage resumes that run from its latest checkpoint (docs/LIBRARIES.md, 'Ray: resume and fault tolerance').
    Checkpoints are ranked by `METRIC`. `controller_failure_limit`: Train retries a worker group
    that cannot be placed forever (-1), right while an autoscaler adds nodes; on a fixed cluster
    that means leaked resources, so the search gives a limit there. `train_fn`: another
    per-worker function (the benches time one; the fault tests inject NaN losses).
    `storage_path`: a folder or a URI (s3://, gs://), resolved here, on the trial's node."""
    path, fs = storage.for_ray(storage_path)
    return TorchTrainer(
        train_fn or train_fn_per_worker,
        train_loop_config=dict(config),
        scaling_config=ScalingConfig(
            num_workers=resources.workers_per_trial,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=resources.per_worker(),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=num_to_keep, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            failure_config=FailureConfig(
                max_failures=max_failures, controller_failure_limit=controller_failure_limit
            ),
            callbacks=list(callbacks),
        ),
    )


# --- layer 2: a Tune trial's driver -----------------------------------------------------------
@dataclass(frozen=True)
class DriverSettings:
    """Everything a trial's driver needs besides its config (picklable: it travels with the
    trainable through `tune.with_parameters`)."""

    experiment: str
    storage_path: str  # a folder or a URI (no filesystem object: its credentials would travel too)
    resources: TrialResources = field(default_factory=TrialResources)
    num_to_keep: int = 2
    max_failures: int = 1
    controller_failure_limit: int = -1  # see build_trainer
    thread_factor: int = 1  # torch threads x this (configs with a fixed count), with as many more CPUs


class NodeReportCallback(TuneReportCallback):
    """TuneReportCallback that also reports where the trial ran: `node_id` = the node of the
    trial's driver (the Train controller is pinned there), and `worker_node_ids` = the nodes of
    the Train workers when the per-worker function reports its own `node_id`."""

    def __init__(self) -> None:
        super().__init__()
        self._node_id = ray.get_runtime_context().get_node_id()

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        workers = sorted({str(m["node_id"]) for m in metrics if "node_id" in m})
        first = {**metrics[0], "node_id": self._node_id}
        if workers:
            first["worker_node_ids"] = ",".join(workers)
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def train_driver_fn(config: dict[str, Any], settings: DriverSettings, train_fn: WorkerFn | None = None) -> None:
    """One Tune trial: fit a TorchTrainer; metrics reach Tune through the report callback."""
    trial_id = tune.get_context().get_trial_id()
    train_config = trial_train_config(config)
    if settings.thread_factor > 1 and int(train_config.get("threads", 0)) > 0:
        train_config["threads"] = int(train_config["threads"]) * settings.thread_factor  # how it runs, not what
    build_trainer(
        train_config,
        name=train_run_name(settings.experiment, trial_id),
        storage_path=settings.storage_path,
        resources=settings.resources,
        num_to_keep=settings.num_to_keep,
        max_failures=settings.max_failures,
        controller_failure_limit=settings.controller_failure_limit,
        callbacks=[NodeReportCallback()],
        train_fn=train_fn,
    ).fit()


def make_trainable(settings: DriverSettings, train_fn: WorkerFn | None = None) -> Any:
    """The Tune trainable for `settings` (the same call rebuilds it for `Tuner.restore`)."""
    fn = tune.with_parameters(train_driver_fn, settings=settings, train_fn=train_fn)
    return tune.with_resources(fn, {"CPU": DRIVER_CPUS})


# --- reading a finished run -------------------------------------------------------------------
def best_checkpoint(run_dir: str | Path) -> tuple[str | None, float]:
    """(location, score) of a Train run's best kept checkpoint by `METRIC`, or (None, nan).
    `run_dir` is a folder or a URI; the location returned is of the same kind."""
    if not storage.exists(run_dir):
        return None, math.nan
    path, fs = storage.for_ray(run_dir)
    with ray_env.quiet_checkpoint_manager():
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    ckpt = result.get_best_checkpoint(METRIC, MODE)
    if ckpt is None:
        return None, math.nan
    score = next(
        (m.get(METRIC, math.nan) for c, m in result.best_checkpoints if c.path == ckpt.path), math.nan
    )
    return storage.to_location(run_dir, ckpt.path), float(score)
