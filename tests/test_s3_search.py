"""`--storage s3://...` end to end against a real S3 API (moto's server, see conftest): a search
whose trials, checkpoints and report land in the bucket, resumed from the bucket alone (the local
mirror deleted in between), fold refits, and an ensemble that finds the experiment and its
members in the bucket and uploads a valid submission (slow: real Ray Train trials)."""

from __future__ import annotations

import math
import shutil

import optuna
import pytest
from test_ensemble import _cli
from test_search import SMOKE_SPACE, write_space
from test_storage import keys

from geopose_ray import experiment, storage
from geopose_ray.constants import SUBMISSION_ARCHIVE
from geopose_ray.ensemble.report import REPORT_JSON
from geopose_ray.submission import check_submission
from geopose_ray.tune import search

NAME = "s3e2e"


def _objects(bucket: str) -> list[str]:
    return keys(bucket, "runs/")


@pytest.mark.slow
@pytest.mark.ray
def test_search_resume_refit_and_ensemble_on_s3(ray_session, synthetic_dir, s3_bucket, tmp_path, capsys):
    root = f"s3://{s3_bucket}/runs"
    cache = tmp_path / "cache"
    base = {
        "space": str(write_space(tmp_path, SMOKE_SPACE.replace("num_samples: 4", "num_samples: 2"), NAME)),
        "data": str(synthetic_dir),
        "storage": root,
        "local_cache": str(cache),
        "workers_per_trial": 1,
        "cpus_per_worker": 1.0,
        "max_epochs": 1,
        "seed": 0,
    }
    first = search.run_search(search.SearchOptions(**base))
    assert first.location == f"{root}/{NAME}" and first.trials == 2 and not first.interrupted
    assert first.experiment_dir == cache / s3_bucket / "runs" / NAME  # the report's local copy
    objects = _objects(s3_bucket)
    for name in (*experiment.REPORT_FILES, experiment.OPTIONS, experiment.OPTUNA_DB):
        assert f"runs/{NAME}/{name}" in objects, name
    for tid in first.leaderboard["trial_id"]:  # Tune's trial folders and Train's checkpoints
        assert f"runs/{NAME}/trial_{tid}/result.json" in objects
        assert any(
            k.startswith(f"runs/{NAME}-{tid}/checkpoint_") and k.endswith("/state.pt") for k in objects
        )

    shutil.rmtree(cache)  # resumed from the bucket alone, as on another machine
    second = search.run_search(search.SearchOptions(**base, resume=True, refit_top=1, folds=(0, 1)))
    assert sorted(second.leaderboard["trial_id"]) == sorted(first.leaderboard["trial_id"])  # none re-run
    assert (second.leaderboard["status"] == "TERMINATED").all()
    study = optuna.load_study(
        study_name=NAME, storage=f"sqlite:///{second.experiment_dir / experiment.OPTUNA_DB}"
    )
    assert len(study.trials) == 2  # the study's copy came back from the bucket, with no extra trial
    members = second.members
    assert sorted((m["fold"], m["source"]) for m in members) == [(0, "search"), (1, "refit")]
    for m in members:
        assert m["checkpoint"].startswith(f"{root}/{NAME}-")
        assert storage.is_file(storage.join(m["checkpoint"], "state.pt")) and storage.is_file(m["val_score"])
    assert math.isfinite(members[0]["config_oof_score"])
    objects = _objects(s3_bucket)
    assert f"runs/{NAME}/{experiment.MEMBERS}" in objects
    assert f"runs/{NAME}-refit/{experiment.LEADERBOARD}" in objects

    # the ensemble finds the newest experiment with members in the bucket; its actors download the
    # checkpoints into the local cache; the outputs but predictions/ are uploaded
    code = _cli().main(
        ["--storage", root, "--local-cache", str(cache), "--data", str(synthetic_dir), "--tta", "none"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"uploaded to {root}/{NAME}/ensemble" in out
    objects = _objects(s3_bucket)
    for name in (SUBMISSION_ARCHIVE, REPORT_JSON):
        assert f"runs/{NAME}/ensemble/{name}" in objects
    assert not [k for k in objects if "/ensemble/predictions/" in k]
    archive = storage.download(f"{root}/{NAME}/ensemble/{SUBMISSION_ARCHIVE}", tmp_path / SUBMISSION_ARCHIVE)
    assert check_submission(archive, synthetic_dir) == []
    for m in members:
        assert (storage.cache_path(m["checkpoint"], cache) / "state.pt").is_file()
