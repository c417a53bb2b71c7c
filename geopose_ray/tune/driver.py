"""Layer 2 of Ray's three-layer shape: one Tune trial = one Ray Train run.

`train_driver_fn` is the Tune function trainable. It builds a `TorchTrainer` around the
per-worker function (layer 3, `geopose_ray.tune.worker.train_fn_per_worker`), named after the
experiment and the trial id (no timestamps, so a restored trial finds its Train run snapshot and
resumes from its latest checkpoint), and lets `TuneReportCallback` forward rank 0's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from geopose_ray.config import key_owners

DRIVER_CPUS = 0.01  # a driver only waits on its Train run; {"CPU": 0} is refused by Tune
METRIC, MODE = "score", "max"
REFIT_CONFIGS = "refit_configs"  # refit trials: {"refit_configs": [...], "member": {"config_rank", "fold"}}


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds: `workers_per_trial` Train workers plus a near-free driver."""

    workers_per_trial: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker > 0:
            res["GPU"] = self.gpus_per_worker
        return res

    def max_concurrent(self, cluster: dict[str, float]) -> int:
        """Trials that fit at once: Tune only sees the drivers' 0.01 CPU, never the Train
        workers, so without this cap it would start trials whose workers can never be placed."""
        limits = []
        cpus = self.workers_per_trial * self.cpus_per_worker + DRIVER_CPUS
        limits.append(math.floor(cluster.get("CPU", 0.0) / cpus + 1e-9))
        if self.gpus_per_worker > 0:
            gpus = self.workers_per_trial * self.gpus_per_worker
            limits.append(math.floor(cluster.get("GPU", 0.0) / gpus + 1e-9))
        return max(1, min(limits))

    def fits(self, cluster: dict[str, float]) -> bool:
        """True when one trial's workers can be placed on a cluster of this size at all."""
        cpu_ok = self.workers_per_trial * self.cpus_per_worker + DRIVER_CPUS <= cluster.get("CPU", 0.0) + 1e-9
        gpu_ok = self.workers_per_trial * self.gpus_per_worker <= cluster.get("GPU", 0.0) + 1e-9
        return cpu_ok and gpu_ok


@dataclass(frozen=True)
class DriverSettings:
    """Everything a trial's driver needs besides its config (picklable: it travels with the
    trainable through `tune.with_parameters`)."""

    experiment: str
    storage_path: str
    resources: TrialResources = field(default_factory=TrialResources)
    num_to_keep: int = 2
    max_failures: int = 1
    # Train retries a worker group that cannot be placed forever (-1), right while an autoscaler
    # adds nodes; on a fixed cluster a few minutes of that means leaked resources: fail the trial.
    controller_failure_limit: int = -1
    train_fn: Callable[[dict], None] | None = None  # None = geopose_ray.tune.worker.train_fn_per_worker


def train_run_name(experiment: str, trial_id: str) -> str:
    """Train run folder of a trial: stable across restarts, unique across experiments."""
    return f"{experiment}-{trial_id}"


def trial_train_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat Config dict a trial trains: search trials carry it directly, refit trials pick
    their row of `refit_configs` and their fold (`member`). Keys outside Config are bookkeeping."""
    if REFIT_CONFIGS in config:
        member = config["member"]
        config = {**config[REFIT_CONFIGS][int(member["config_rank"])], "fold": int(member["fold"])}
    owners = key_owners()
    return {k: v for k, v in config.items() if k in owners}


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


def train_driver_fn(config: dict[str, Any], settings: DriverSettings) -> None:
    """One Tune trial: fit a TorchTrainer; metrics reach Tune through the report callback."""
    trial_id = tune.get_context().get_trial_id()
    res = settings.resources
    train_fn = settings.train_fn
    if train_fn is None:
        from geopose_ray.tune.worker import train_fn_per_worker as train_fn
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=trial_train_config(config),
        scaling_config=ScalingConfig(
            num_workers=res.workers_per_trial,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=res.per_worker(),
        ),
        run_config=ray.train.RunConfig(
            name=train_run_name(settings.experiment, trial_id),
            storage_path=settings.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=settings.num_to_keep,
                checkpoint_score_attribute=METRIC,
                checkpoint_score_order=MODE,
            ),
            failure_config=FailureConfig(
                max_failures=settings.max_failures, controller_failure_limit=settings.controller_failure_limit
            ),
            callbacks=[NodeReportCallback()],
        ),
    )
    trainer.fit()


def trial_dirname(trial: Any) -> str:
    """Tune trial folder `trial_<id>`: the default embeds every sampled value (and the data path)."""
    return f"trial_{trial.trial_id}"


def make_trainable(settings: DriverSettings) -> Any:
    """The Tune trainable for `settings` (the same call rebuilds it for `Tuner.restore`)."""
    fn = tune.with_parameters(train_driver_fn, settings=settings)
    return tune.with_resources(fn, {"CPU": DRIVER_CPUS})
