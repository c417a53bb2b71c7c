"""Shared fixtures: one Ray instance per test session, one small synthetic data set, a local S3
server (moto) for the cloud-storage tests."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Every S3 request of the tests goes to the local moto server of `s3_server`, never to AWS. Set
# here, before any Ray instance starts, so that its workers (which upload checkpoints) inherit it.
S3_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update(
    AWS_ENDPOINT_URL=S3_ENDPOINT,
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by all tests (dashboard on: ASHA-stopped trials need the
    State API to free their placement groups, see docs/LIBRARIES.md, 'Ray: environment')."""
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
def s3_server():
    """moto's S3 API on 127.0.0.1 at AWS_ENDPOINT_URL (a real HTTP server: pyarrow, boto3 and the
    Ray workers all reach it through the usual AWS settings)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(S3_ENDPOINT.rsplit(":", 1)[1]), verbose=False)
    server.start()
    yield S3_ENDPOINT
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new empty bucket's name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic DrivenData-layout set (64 px tiles, 3 train + 1 test tiles per city),
    converted into its default cache: runs only read a cache (their driver converts)."""
    from geopose_ray.convert import ensure_cache, serial_map
    from geopose_ray.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, size=64, per_city=3, test_per_city=1, seed=0)
    ensure_cache(out, map_fn=serial_map, progress=False)
    return out


@pytest.fixture(scope="session")
def synthetic_cache(synthetic_dir) -> Path:
    """`synthetic_dir`'s conversion cache."""
    from geopose_ray import paths

    return paths.default_cache_dir(synthetic_dir)
