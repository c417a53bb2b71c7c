"""`gs://` locations against a real GCS JSON API (fake-gcs-server on 127.0.0.1, see conftest,
reached through STORAGE_EMULATOR_HOST): the endpoint choice, `Experiment` and `latest` on a
bucket (seconds, no Ray; the storage module's round trip runs on S3 and GCS alike in
tests/test_storage.py), and a small Tune run whose trial folders and checkpoint
land in the bucket and are read back through the project's readers (one function trainable, no
TorchTrainer: the full search on a bucket is tested on S3, tests/test_s3_search.py)."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

import pytest

from geopose_ray import storage
from geopose_ray.experiment import MEMBERS, Experiment, latest


def gcs_keys(bucket: str, prefix: str = "") -> list[str]:
    """The bucket's object names (JSON API), without the empty `folder/` markers pyarrow writes."""
    endpoint = os.environ[storage.GCS_EMULATOR_ENV]
    found, token = [], ""
    while True:
        query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
        with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
            listed = json.load(r)
        found += [o["name"] for o in listed.get("items", []) if not o["name"].endswith("/")]
        token = listed.get("nextPageToken", "")
        if not token:
            return sorted(found)


def _gcs_options(location: str) -> dict:
    fs, _ = storage.resolve(location)
    return fs.__reduce__()[1][0]  # GcsFileSystem's options, as Ray's workers receive them


def test_gcs_emulator_variable_picks_the_endpoint(monkeypatch):
    """STORAGE_EMULATOR_HOST (URL or host:port) sends gs:// to it without credentials; unset,
    pyarrow's defaults: Google's endpoint over https with the application default credentials."""
    monkeypatch.setenv(storage.GCS_EMULATOR_ENV, "http://127.0.0.1:1")
    opts = _gcs_options("gs://b/p")
    assert (opts["scheme"], opts["endpoint_override"], opts["anonymous"]) == ("http", "127.0.0.1:1", True)
    monkeypatch.setenv(storage.GCS_EMULATOR_ENV, "localhost:2")
    assert _gcs_options("gcs://b/p")["endpoint_override"] == "localhost:2"
    monkeypatch.delenv(storage.GCS_EMULATOR_ENV)
    opts = _gcs_options("gs://b/p")
    assert (opts["scheme"], opts["endpoint_override"], opts["anonymous"]) == ("https", "", False)


def test_experiment_on_a_gcs_bucket_pushes_fetches_and_is_found(gcs_bucket, tmp_path):
    """`Experiment` and `latest` on GCS, where a folder made by one upload has no marker object
    (the round trip itself runs on S3 and GCS alike: tests/test_storage.py)."""
    exp = Experiment(f"gs://{gcs_bucket}/p", "e", cache=tmp_path / "cache")
    assert exp.remote and exp.dir == tmp_path / "cache" / gcs_bucket / "p" / "e"
    exp.dir.mkdir(parents=True)
    exp.members.write_text("[]")
    exp.push(MEMBERS)
    assert gcs_keys(gcs_bucket, "p/") == ["p/e/members.json"]
    exp.members.unlink()
    assert exp.fetch(MEMBERS) == exp.members and exp.members.read_text() == "[]"
    assert latest(f"gs://{gcs_bucket}/p") == "e"


def tiny_trainable(config: dict) -> None:
    """Two reports, the second with a one-file checkpoint (uploaded by Tune to the bucket)."""
    import tempfile
    from pathlib import Path

    from ray import tune

    tune.report({"epoch": 1, "score": config["x"]})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "state.txt").write_text(f"x={config['x']}")
        tune.report({"epoch": 2, "score": 2 * config["x"]}, checkpoint=tune.Checkpoint.from_directory(tmp))


@pytest.mark.slow
@pytest.mark.ray
def test_tune_run_on_gcs_is_read_back_by_the_project(ray_session, gcs_bucket, tmp_path):
    """A Tune run with `storage.for_ray(gs://...)` as its storage, as the search's RunConfig
    (`tuner.run_config_kwargs`) builds it: the trial folders, the experiment state and the
    checkpoint are in the bucket, and `tuner.can_restore` / `tuner.read_trials` and the storage
    module's local copy read them back from there."""
    import sys

    from ray import cloudpickle, tune

    from geopose_ray.experiment import trial_dirname
    from geopose_ray.tune import tuner as tuner_mod

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    root = f"gs://{gcs_bucket}/runs"
    path, fs = storage.for_ray(root)
    results = tune.Tuner(
        tune.with_resources(tiny_trainable, {"CPU": 0.5}),
        param_space={"x": tune.grid_search([1.0, 3.0])},
        run_config=tune.RunConfig(
            name="tiny",
            storage_path=path,
            storage_filesystem=fs,
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
        tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: trial_dirname(t.trial_id)),
    ).fit()
    assert not results.errors and len(results) == 2
    objects = gcs_keys(gcs_bucket, "runs/")
    experiment = storage.join(root, "tiny")
    assert tuner_mod.can_restore(experiment)
    assert any(k.startswith("runs/tiny/experiment_state-") for k in objects), objects
    trials = tuner_mod.read_trials(experiment)
    assert sorted(t[2]["x"] for t in trials) == [1.0, 3.0]
    for trial_id, status, config, history, _ in trials:
        assert status == "TERMINATED" and list(history["epoch"]) == [1, 2]
        assert history["score"].iloc[-1] == 2 * config["x"]
        assert f"runs/tiny/{trial_dirname(trial_id)}/result.json" in objects
    for r in results:
        location = storage.to_location(root, r.checkpoint.path)
        assert location.startswith(f"{experiment}/trial_") and r.checkpoint.filesystem.type_name == "gcs"
        copy = storage.local_copy(location, tmp_path / "cache")
        assert (copy / "state.txt").read_text() == f"x={r.config['x']}"
