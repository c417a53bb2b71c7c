"""How many trials run at once: the limit follows the cluster while the search runs (a node that
joins is used), keeps `pending` trials waiting for an autoscaler, and obeys a cap. The same on a
real joining `ray start` node: tests/test_cluster.py."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest
from ray import cloudpickle
from ray.tune.search import Searcher

from geopose_ray import ray_env
from geopose_ray.errors import InputError
from geopose_ray.tune import options, search, tuner
from geopose_ray.tune.capacity import Capacity, TrialResources
from geopose_ray.tune.tuner import ElasticLimiter

TRIAL = TrialResources(workers_per_trial=2, cpus_per_worker=1.0, gpus_per_worker=1.0)  # 2 GPUs, 2.01 CPUs


def test_max_concurrent_counts_train_workers_not_drivers():
    cpu = TrialResources(workers_per_trial=2, cpus_per_worker=1.0)
    assert cpu.max_concurrent({"CPU": 5.0}) == 2  # 2 x (2 + 0.01) <= 5 < 3 x 2.01
    assert cpu.max_concurrent({"CPU": 1.0}) == 1  # at least one
    gpu = TrialResources(workers_per_trial=2, cpus_per_worker=4.0, gpus_per_worker=1.0)
    assert gpu.max_concurrent({"CPU": 64.0, "GPU": 4.0}) == 2  # GPUs bind
    assert gpu.max_concurrent({"CPU": 12.0, "GPU": 8.0}) == 1  # CPUs bind
    assert cpu.fits({"CPU": 2.01}) and not cpu.fits({"CPU": 2.0}) and not gpu.fits({"CPU": 64.0})


HEAD = {"CPU": 16.0, "GPU": 0.0}
MOST = {"CPU": 80.0, "GPU": 8.0}  # head + 4 nodes of 2 GPUs: what cluster.yaml's autoscaler may build


@pytest.mark.parametrize(
    ("cluster", "most", "pending", "cap", "expected"),
    [
        (HEAD, None, 0, None, 1),  # head only, fixed: never below 1
        (HEAD, None, 1, None, 2),  # head only, nodes may join: one trial waits for them
        ({"CPU": 16.0, "GPU": 4.0}, None, 0, None, 2),  # two nodes of 2 GPUs
        ({"CPU": 16.0, "GPU": 4.0}, None, 1, None, 3),  # + one waiting
        (HEAD, MOST, 1, None, 4),  # autoscaler: plan for its largest cluster (pending unused)
        ({"CPU": 80.0, "GPU": 8.0}, MOST, 1, None, 4),  # fully scaled: no trial beyond max_workers
        (HEAD, MOST, 0, 3, 3),  # capped
        ({"CPU": 4.0, "GPU": 16.0}, None, 0, None, 1),  # CPUs bind
        (HEAD, {"CPU": 80.0}, 1, None, 2),  # GPUs left to auto-detection: the maximum says nothing
    ],
)
def test_capacity_limit(cluster, most, pending, cap, expected):
    assert Capacity(TRIAL, pending=pending, cap=cap).limit(cluster, most) == expected


@pytest.mark.ray
def test_cluster_resources_reads_the_live_cluster(ray_session):
    now, most = ray_env.cluster_resources()
    assert now["CPU"] == 4.0 and most is None  # the test instance: no autoscaler config


def test_capacity_options_defaults_and_bad_values(tmp_path):
    local = search.SearchOptions(space="s.yaml")  # fixed_cluster defaults to True (a local instance)
    assert search.resolve_capacity(local, TRIAL) == Capacity(TRIAL, pending=0, cap=None)
    joined = search.SearchOptions(space="s.yaml", fixed_cluster=False, max_concurrent=8)
    assert search.resolve_capacity(joined, TRIAL) == Capacity(TRIAL, pending=1, cap=8)
    for bad, flag in (
        ({"pending_trials": -1}, "--pending-trials"),
        ({"max_concurrent": 0}, "--max-concurrent"),
        ({"refit_seeds": 0}, "--refit-seeds"),
        ({"refit_epochs": 0}, "--refit-epochs"),
    ):
        with pytest.raises(InputError, match=flag):
            options.check_capacity_options(search.SearchOptions(space="s.yaml", **bad))


class CountingSearcher(Searcher):
    """Suggests {"i": n} forever; records completions."""

    def __init__(self):
        super().__init__(metric="score", mode="max")
        self.n = 0

    def suggest(self, trial_id):
        self.n += 1
        return {"i": self.n}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


class Cluster:
    """A cluster whose size a test changes (picklable, like the real resources_fn must be)."""

    def __init__(self, gpus: float):
        self.gpus = gpus

    def __call__(self) -> tuple[dict[str, float], None]:
        return {"CPU": 64.0, "GPU": self.gpus}, None


def admitted(limiter: ElasticLimiter, start: int, n: int = 10) -> list[str]:
    return [f"t{i}" for i in range(start, start + n) if limiter.suggest(f"t{i}") is not None]


def test_limiter_follows_the_cluster_as_nodes_join_and_leave(monkeypatch):
    monkeypatch.setattr(tuner, "REFRESH_S", 0.0)
    cluster = Cluster(gpus=2.0)  # one trial fits
    limiter = ElasticLimiter(CountingSearcher(), Capacity(TRIAL, pending=1), resources_fn=cluster)
    assert admitted(limiter, 0) == ["t0", "t1"]  # one placed, one waiting for the autoscaler
    cluster.gpus = 6.0  # two nodes joined: 3 fit, + 1 pending
    assert admitted(limiter, 10) == ["t10", "t11"]
    assert limiter.max_concurrent == 4
    cluster.gpus = 2.0  # nodes left: no new trial until live ones end
    assert admitted(limiter, 20) == []
    for tid in ("t0", "t1", "t10"):
        limiter.on_trial_complete(tid, result={"score": 0.0})
    assert admitted(limiter, 30) == ["t30"]  # back to 1 + 1 live
    state = cloudpickle.loads(cloudpickle.dumps(limiter.get_state()))  # Tune saves it
    assert state["capacity"] == Capacity(TRIAL, pending=1) and state["resources_fn"].gpus == 2.0


def test_limiter_asks_the_cluster_at_most_every_refresh_period(monkeypatch):
    calls = []

    def counted() -> tuple[dict[str, float], None]:
        calls.append(1)
        return {"CPU": 64.0, "GPU": 2.0}, None

    limiter = ElasticLimiter(CountingSearcher(), Capacity(TRIAL), resources_fn=counted)
    admitted(limiter, 0, n=50)
    assert len(calls) == 2  # at construction, then the first suggest; the rest within REFRESH_S


def timed_trainable(config: dict) -> None:
    """Records its wall-time span; the first trial to end 'adds a node' (writes the flag)."""
    from ray import tune

    start = time.time()
    time.sleep(config["sleep_s"])
    end = time.time()
    Path(config["grow_flag"]).touch()
    tune.report({"epoch": 1, "score": float(config["i"]), "start": start, "end": end})


class FlagCluster:
    """One trial fits until the flag file exists, then two (the driver process reads it)."""

    def __init__(self, flag: str):
        self.flag = flag

    def __call__(self) -> tuple[dict[str, float], None]:
        return {"CPU": 64.0, "GPU": 4.0 if Path(self.flag).exists() else 2.0}, None


@pytest.mark.ray
def test_a_running_tune_search_admits_more_trials_when_the_cluster_grows(ray_session, tmp_path):
    """Through Tune itself: one trial at a time until the cluster grows (when the first trial
    ends), then two at once, never more."""
    from ray import tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    flag = str(tmp_path / "grown")
    limiter = ElasticLimiter(CountingSearcher(), Capacity(TRIAL), resources_fn=FlagCluster(flag))
    tuner = tune.Tuner(
        tune.with_resources(timed_trainable, {"CPU": 0.01}),
        param_space={"grow_flag": flag, "sleep_s": 4.0},
        tune_config=tune.TuneConfig(search_alg=limiter, num_samples=4, metric="score", mode="max"),
        run_config=tune.RunConfig(name="grow", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()
    spans = sorted((r.metrics["start"], r.metrics["end"]) for r in results)
    assert len(spans) == 4 and not results.errors

    def live_at(t: float) -> int:
        return sum(s <= t < e for s, e in spans)

    assert spans[1][0] >= spans[0][1], json.dumps(spans)  # before: the second waited for the first
    assert max(live_at(s) for s, _ in spans[1:]) == 2, json.dumps(spans)  # after: two at once


def test_a_trial_larger_than_the_autoscalers_largest_cluster_is_refused():
    from geopose_ray.tune.space import load_space

    path = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"
    opts = search.SearchOptions(space=str(path), fixed_cluster=False, workers_per_trial=8, gpus_per_worker=1)
    space = load_space(path)
    res = search.resolve_resources(opts, space, HEAD, MOST)  # 8 GPUs may come: waits for them
    assert res.workers_per_trial * res.gpus_per_worker == 8
    with pytest.raises(InputError, match="largest cluster"):
        search.resolve_resources(dataclasses.replace(opts, workers_per_trial=9), space, HEAD, MOST)
    unknown_gpus = {"CPU": 80.0}  # a maximum without GPUs: not a reason to refuse
    assert search.resolve_resources(dataclasses.replace(opts, workers_per_trial=9), space, HEAD, unknown_gpus)
