"""How many trials run at once, re-read from the cluster while the search runs.

Tune only sees each trial's near-free driver (0.01 CPU), never its Train workers, so it must be
told how many trials fit. A number fixed at start-up goes stale on an autoscaling cluster: the
search would keep running one trial on a cluster that has grown to eight GPUs. `ElasticLimiter`
wraps the searcher like Tune's `ConcurrencyLimiter`, but re-computes the limit from
the cluster whenever Tune asks for a new trial:

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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune.search import ConcurrencyLimiter, Searcher

from geopose_ray.tune.driver import TrialResources

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # Tune asks for suggestions many times a second; the GCS need not be asked as often


def cluster_resources() -> tuple[dict[str, float], dict[str, float] | None]:
    """(the cluster's resources now, the most its autoscaler may reach or None without one)."""
    import ray
    from ray._private.state import state  # what Ray Train V2's worker group reads too

    try:
        most = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: planning for the largest cluster is optional
        most = None
    return ray.cluster_resources(), most


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


class ElasticLimiter(ConcurrencyLimiter):
    """`ConcurrencyLimiter` whose `max_concurrent` follows the cluster's size (see module doc).

    `resources_fn` returns (the cluster's resources now, the autoscaler's maximum or None), see
    `cluster_resources`; tests pass a fake one. It must pickle: Tune saves the searcher with the
    experiment state."""

    def __init__(
        self,
        searcher: Searcher,
        capacity: Capacity,
        resources_fn: Callable[[], tuple[dict[str, float], dict[str, float] | None]] = cluster_resources,
    ):
        self.capacity = capacity
        self.resources_fn = resources_fn
        self._checked_at = float("-inf")
        super().__init__(searcher, max_concurrent=self._limit())

    def _limit(self) -> int:
        return self.capacity.limit(*self.resources_fn())

    def refresh(self) -> int:
        """Re-read the cluster (at most every REFRESH_S seconds); returns the current limit."""
        now = time.monotonic()
        if abs(now - self._checked_at) >= REFRESH_S:  # abs: a restored searcher's clock was another process's
            self._checked_at = now
            limit = self._limit()
            if limit != self.max_concurrent:
                log.info("cluster changed: up to %d trials at once (was %d)", limit, self.max_concurrent)
                self.max_concurrent = limit
        return self.max_concurrent

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self.refresh()
        return super().suggest(trial_id)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._checked_at = float("-inf")  # a restored search re-reads the (maybe new) cluster
