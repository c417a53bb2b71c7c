"""Shared fixtures: one Ray instance per test session, one small synthetic data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by all tests (dashboard on: ASHA-stopped trials need the
    State API to free their placement groups, see RAY_NOTES section 0)."""
    import ray

    from geopose_ray.ray_env import pin_local_address

    if not ray.is_initialized():
        # The raylet inherits RAY_ADDRESS, so Train's placement-group cleaner finds THIS instance
        # even when another Ray instance runs on the machine (else it fails and stopped trials
        # never free their CPUs); dropped again so subprocesses start their own instances.
        pin_local_address()
        ray.init(
            address="local",
            num_cpus=4,
            log_to_driver=False,
            include_dashboard=True,
            object_store_memory=200 * 2**20,
        )
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic DrivenData-layout set (64 px tiles, 3 train + 1 test tiles per city)."""
    from geopose_ray.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, size=64, per_city=3, test_per_city=1, seed=0)
    return out
