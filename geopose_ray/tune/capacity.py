"""How many trials run at once, re-read from the cluster while the search runs.

Tune only sees each trial's near-free driver (0.01 CPU), never its Train workers, so it must be
told how many trials fit. A number fixed at start-up goes stale on an autoscaling cluster: the
search would keep running one trial on a cluster that has grown to eight GPUs. `Capacity` is
the rule (no Ray here); `tuner.ElasticLimiter` wraps the searcher like Tune's
`ConcurrencyLimiter`, but re-computes the limit by it whenever Tune asks for a new trial:

    with an autoscaler:    limit = min(cap, trials that fit the largest cluster it may build)
    without one:           limit = min(cap, trials that fit the cluster now + pending)

Trials beyond what fits now are admitted on purpose: their placement groups wait, and that
waiting demand is what makes Ray's autoscaler add nodes (it scales on demand, never ahead of it),
for all of them at once, up to each node type's `max_workers` (read from the autoscaler's config,
as Ray Train itself does). Where no autoscaler config exists (`ray start` nodes joined by hand)
the limit follows the nodes alive, plus `pending` waiting trials; on a fixed local instance
`pending` is 0: nothing could ever place those trials.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

DRIVER_CPUS = 0.01  # a driver only waits on its Train run; {"CPU": 0} is refused by Tune
LOCAL = "local"  # the address of a new local Ray instance (`ray.init(address="local")`)


def resolve_address(address: str | None) -> str:
    """The cluster a command joins: `address`, else RAY_ADDRESS, else a new local instance
    (`LOCAL`). Here, without Ray, so that a dry run can tell without importing it."""
    return address or os.environ.get("RAY_ADDRESS") or LOCAL


def local_cluster() -> tuple[dict[str, float], None]:
    """What a new local Ray instance would have, read without starting one (a dry run's plan):
    every core, as `ray.init` counts them, and the GPUs torch sees; no autoscaler (None)."""
    import torch

    gpus = torch.cuda.device_count()
    return {"CPU": float(os.cpu_count() or 1), **({"GPU": float(gpus)} if gpus else {})}, None


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


def knows_every_need(most: dict[str, float] | None, resources: TrialResources) -> bool:
    """True when the autoscaler's maximum names every resource a trial needs. Ray sums only the
    resources written in the cluster config's node types; a type left to auto-detection (the
    local provider, or GPUs not written down) is missing from it, and then says nothing."""
    return bool(most) and all(key in most for key in resources.per_worker())


@dataclass(frozen=True)
class Capacity:
    """What decides how many trials run at once (see the module doc)."""

    resources: TrialResources
    pending: int = 0  # trials admitted beyond what fits: autoscaler demand
    cap: int | None = None  # never more than this many; None: no cap

    def limit(self, cluster: dict[str, float], most: dict[str, float] | None = None) -> int:
        """Trials to run at once on a cluster of this size that may grow to `most` (None: no
        autoscaler); never below 1."""
        limit = self.resources.max_concurrent(cluster)
        if knows_every_need(most, self.resources):
            limit = max(limit, self.resources.max_concurrent(most))
        else:
            limit += max(0, self.pending)
        return max(1, min(limit, self.cap) if self.cap else limit)
