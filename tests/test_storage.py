"""The storage module against a real S3 API (moto's server on 127.0.0.1, see conftest; the round
trip also against GCS's, fake-gcs-server): URIs,
upload / download round trips, the local mirror, `Experiment` on a bucket, and bad URIs or a
missing optional package ending the commands with exit 2 (seconds, no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from test_gcs_storage import gcs_keys
from test_search import PLAIN_SPACE, ROOT, write_space

from geopose_ray import storage
from geopose_ray.errors import InputError
from geopose_ray.experiment import MEMBERS, OPTUNA_DB, Experiment, latest


def keys(bucket: str, prefix: str = "") -> list[str]:
    """The bucket's object keys, without the empty `folder/` markers pyarrow writes."""
    found, token = [], {}
    while True:
        listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix, **token)
        found += [o["Key"] for o in listed.get("Contents", []) if not o["Key"].endswith("/")]
        if not listed.get("IsTruncated"):
            return sorted(found)
        token = {"ContinuationToken": listed["NextContinuationToken"]}


def test_uri_parsing_and_joining(tmp_path):
    assert storage.is_remote("s3://b/p") and storage.is_remote("gs://b/p")
    assert (
        not storage.is_remote("/abs/dir")
        and not storage.is_remote("rel")
        and not storage.is_remote("file:///x")
    )
    assert storage.normalize("file:///tmp/x") == Path("/tmp/x")
    assert storage.normalize(tmp_path / "a" / ".." / "b") == tmp_path / "b"
    assert storage.join("s3://b/p/", "exp", "trial_1/") == "s3://b/p/exp/trial_1"
    assert storage.join("s3://b/p?region=x", "e") == "s3://b/p/e?region=x"  # pyarrow options kept
    assert storage.join(tmp_path, "e", "f") == str(tmp_path / "e" / "f")
    assert storage.parent("s3://b/p/e/members.json") == "s3://b/p/e"
    assert storage.to_location("s3://b/p", "b/p/e-1/checkpoint_0") == "s3://b/p/e-1/checkpoint_0"
    assert storage.to_location(tmp_path, "/x/y") == "/x/y"
    assert storage.cache_path("s3://b/p/e", tmp_path) == tmp_path / "b" / "p" / "e"
    assert storage.for_ray(tmp_path) == (str(tmp_path), None)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [("s3://", "needs a bucket"), ("nope://bucket/x", "cannot open"), ("s3:///x", "needs a bucket")],
)
def test_bad_uris_are_input_errors(uri, problem):
    with pytest.raises(InputError, match=problem):
        storage.normalize(uri)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_upload_download_roundtrip_and_local_cache(scheme, request, tmp_path):
    """The same round trip on S3 (moto) and GCS (fake-gcs-server): one storage module, two APIs."""
    bucket = request.getfixturevalue({"s3": "s3_bucket", "gs": "gcs_bucket"}[scheme])
    listed = {"s3": keys, "gs": gcs_keys}[scheme]
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01" * 1000)
    root = f"{scheme}://{bucket}/runs"
    assert storage.normalize(root + "/") == root
    path, fs = storage.for_ray(root)
    assert path == f"{bucket}/runs" and fs.type_name == {"s3": "s3", "gs": "gcs"}[scheme]
    storage.upload(src, storage.join(root, "ckpt"))
    storage.upload(src / "a.txt", storage.join(root, "exp", MEMBERS))
    assert listed(bucket) == ["runs/ckpt/a.txt", "runs/ckpt/sub/b.bin", "runs/exp/members.json"]
    assert storage.is_file(storage.join(root, "ckpt", "a.txt")) and storage.exists(storage.join(root, "ckpt"))
    assert not storage.exists(storage.join(root, "none"))
    assert storage.read_bytes(storage.join(root, "ckpt", "sub", "b.bin")) == b"\x00\x01" * 1000
    with pytest.raises(InputError, match="not found"):
        storage.read_bytes(storage.join(root, "none"))
    cache = tmp_path / "cache"
    copy = storage.local_copy(storage.join(root, "ckpt"), cache)
    assert copy == cache / bucket / "runs" / "ckpt"
    assert (copy / "a.txt").read_text() == "alpha" and (copy / "sub" / "b.bin").stat().st_size == 2000
    (copy / "a.txt").write_text("local")  # downloaded once: a second call keeps the local copy
    assert (
        storage.local_copy(storage.join(root, "ckpt"), cache) == copy
        and (copy / "a.txt").read_text() == "local"
    )
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".tmp-")]
    assert storage.download(storage.join(root, "exp", MEMBERS), tmp_path / "m.json").read_text() == "alpha"
    assert [name for name, _ in storage.subdir_files(root, MEMBERS)] == ["exp"]
    assert latest(root) == "exp" and latest(storage.join(root, "none")) is None


def test_experiment_on_a_bucket_mirrors_locally_and_pushes(s3_bucket, tmp_path):
    exp = Experiment(f"s3://{s3_bucket}/p", "e", cache=tmp_path / "cache")
    assert exp.remote and exp.location == f"s3://{s3_bucket}/p/e"
    assert exp.dir == tmp_path / "cache" / s3_bucket / "p" / "e"
    assert exp.optuna_url == f"sqlite:///{exp.dir / OPTUNA_DB}"  # SQLite stays on a local disk
    assert exp.refit.location == f"s3://{s3_bucket}/p/e-refit" and exp.refit.cache == exp.cache
    assert exp.train_run("abc") == f"s3://{s3_bucket}/p/e-abc"
    exp.dir.mkdir(parents=True)
    exp.members.write_text(json.dumps([]))
    exp.push(MEMBERS, "not-written.csv")
    assert keys(s3_bucket) == ["p/e/members.json"]
    exp.members.unlink()
    assert exp.fetch(MEMBERS) == exp.members and exp.members.read_text() == "[]"
    assert exp.fetch("none.csv") is None
    local = Experiment(tmp_path / "st", "e")
    assert not local.remote and local.dir == tmp_path / "st" / "e" and local.location == str(local.dir)
    local.push(MEMBERS)  # a local experiment is its own storage: nothing to upload


def _script(*args: str, pre: str = "pass") -> subprocess.CompletedProcess:
    """A command in a fresh interpreter (`pre`: Python run first, e.g. hiding a package)."""
    code = f"import runpy, sys; {pre}; sys.argv = {list(args)!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


def test_cli_bad_storage_uri_exits_2(tmp_path):
    space = str(write_space(tmp_path, PLAIN_SPACE))
    out = _script(str(ROOT / "run_search.py"), "--space", space, "--storage", "nope://x/y")  # more: above
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nope://x/y" in out.stderr, out.stderr
    out = _script(str(ROOT / "run_ensemble.py"), "--storage", "nope://x/y")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nope://x/y" in out.stderr, out.stderr


NO_GCS_CREDENTIALS = (
    "import os; os.environ['GOOGLE_APPLICATION_CREDENTIALS'] = '/nonexistent/key.json'; "
    "os.environ.pop('STORAGE_EMULATOR_HOST', None)"
)


def test_gcs_without_credentials_is_one_line_in_seconds_not_a_hang(tmp_path, monkeypatch):
    """Arrow's GCS client retried an unauthenticated request for 15 minutes: the pre-flight probe
    gives up after PROBE_RETRY_S. A key file that does not exist fails before any request, so this
    never reaches the network."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    with pytest.raises(InputError, match="cannot reach this storage") as e:
        storage.probe("gs://geopose-no-such-bucket/experiments")
    assert e.value.path == "gs://geopose-no-such-bucket/experiments"
    space = str(write_space(tmp_path, PLAIN_SPACE))
    uri = "gs://geopose-no-such-bucket/exp"
    out = _script(str(ROOT / "run_search.py"), "--space", space, "--storage", uri, "--dry-run", pre=NO_GCS_CREDENTIALS)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and uri in out.stderr, out.stderr
    assert "cannot reach this storage" in out.stderr
    out = _script(str(ROOT / "run_ensemble.py"), "--storage", uri, "--dry-run", pre=NO_GCS_CREDENTIALS)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "cannot reach this storage" in out.stderr, out.stderr
