"""The one place that starts or joins Ray, and the shim for every Ray API that is not public.

Every command that needs Ray calls `init`: it joins `address` (or RAY_ADDRESS), and otherwise
starts a fresh local instance with its address pinned first (never a stale `ray start` one,
docs/LIBRARIES.md, 'Ray: environment'), with the quiet console of `geopose_ray.console`. Ray's private APIs used by
this project sit here, one comment each, so a Ray upgrade has one file to check.

The package imports `ray` in four files only: this one, `tune/trainer.py` (Ray Train),
`tune/tuner.py` (Ray Tune) and `ensemble/job.py` (Ray Data).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from geopose_ray import console
from geopose_ray.tune.capacity import LOCAL, resolve_address  # Ray-free, so a dry run needs no Ray


def pin_local_address() -> str:
    """Choose the GCS port of the local instance about to start and export its address as
    RAY_ADDRESS, so every process of it (the raylet inherits this environment) finds its own
    cluster. Ray Train's placement-group cleaner looks the cluster up by RAY_ADDRESS; with two
    instances on one machine and none set it fails, and an ASHA-stopped trial's workers then
    hold their CPUs forever. Call just before `ray.init(address="local")`."""
    from ray.util import get_node_ip_address

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    address = f"{get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = address
    return address


def init(
    address: str | None = None,
    *,
    verbose: bool = False,
    num_cpus: int | None = None,
    dashboard: bool | None = True,
) -> str:
    """Join or start Ray (see the module doc) unless this process already is connected; returns
    the address asked for ("local" for a new instance). The dashboard is on by default: ASHA's
    stops need the State API (docs/LIBRARIES.md, 'Ray: environment')."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # token auth breaks local `ray start` clusters
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = resolve_address(address)
    if ray.is_initialized():
        return address
    quiet = console.setup(verbose)
    if not verbose:
        from ray.data import DataContext

        DataContext.get_current().print_on_execution_start = False  # Ray Data's plan lines
        # importing ray.data re-applies its logging config: its per-block progress lines (INFO,
        # every 10 s when stdout is not a terminal) keep going to its session log file only
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout):
                handler.setLevel(logging.WARNING)
    local = address == LOCAL
    if local:
        pin_local_address()
    ray.init(
        address=address,
        include_dashboard=dashboard if local else None,
        **({"num_cpus": num_cpus} if local and num_cpus else {}),
        **quiet,
    )
    return address


def shutdown() -> None:
    ray.shutdown()


def cluster_resources() -> tuple[dict[str, float], dict[str, float] | None]:
    """(the cluster's resources now, the most its autoscaler may reach or None without one)."""
    # private: the autoscaler's largest cluster, which Ray Train V2's worker group reads too
    from ray._private.state import state

    try:
        most = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: planning for the largest cluster is optional
        most = None
    return ray.cluster_resources(), most


def quiet_checkpoint_manager() -> contextlib.AbstractContextManager[None]:
    """Silence the "resuming" notice that loading a Train run snapshot logs."""
    # private: the logger is named after Train V2's internal module
    return console.logger_level("ray.train.v2._internal.execution.checkpoint.checkpoint_manager", logging.WARNING)


def task_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
    """`fn(item)` as one 1-CPU Ray task per item on the connected cluster, results yielded as they
    finish: the Ray `MapFn` of `geopose_ray.convert` (which imports no Ray itself)."""
    task = ray.remote(num_cpus=1)(_apply)  # not `fn` itself: ray.remote refuses a functools.partial
    pending = [task.remote(fn, item) for item in items]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=min(len(pending), 8), timeout=5.0)
            yield from ray.get(done)
    finally:  # the consumer stopped early (a bad tile): cancel what has not run
        for ref in pending:
            ray.cancel(ref)


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)
