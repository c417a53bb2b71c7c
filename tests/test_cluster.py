"""Multi-node Ray for real, on this one machine (docs/LIBRARIES.md, 'Ray: multi-node on one machine'): the cluster files pass
Ray's own config checks; two `ray start` nodes run the smoke search with trials spanning both;
a node that joins a running search raises its concurrency (what an autoscaler does).
The launcher (`ray up`) is tested in test_cluster_launcher.py.

By hand, under the lock: `flock /tmp/geopose_ray.lock .venv/bin/python -m pytest -q tests/test_cluster.py`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers_cluster import (
    ROOT,
    SEARCH_ARGS,
    free_ports,
    head_args,
    join_node,
    max_resources,
    prepared,
    ray_env,
    ray_nodes,
    session_members,
    short_tmp,
    wait_for_nodes,
)

pytestmark = pytest.mark.cluster


def test_cluster_files_pass_rays_config_checks() -> None:
    import ray
    from jsonschema import ValidationError

    from geopose_ray.tune.capacity import TrialResources

    aws = prepared(ROOT / "cluster.yaml")
    assert aws["provider"]["type"] == "aws"
    workers = {k: v for k, v in aws["available_node_types"].items() if k != aws["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) >= aws["max_workers"] > 0
    # the README's trial (2 workers x 1 GPU x 4 CPUs) fits the largest cluster the autoscaler may build
    trial = TrialResources(workers_per_trial=2, cpus_per_worker=4, gpus_per_worker=1)
    assert trial.fits(max_resources(aws)) and trial.max_concurrent(max_resources(aws)) >= 2
    # the nodes install the Ray this project pins (a laptop / cluster version mismatch breaks `ray up`)
    setup = " ".join(aws["setup_commands"])
    assert f"ray[default,train,tune]=={ray.__version__}" in setup and "pip install" in setup

    local = prepared(ROOT / "cluster.local.yaml")
    assert local["provider"]["head_ip"] == "127.0.0.1" and local["provider"]["worker_ips"] == []
    assert local["auth"]["ssh_user"] == "root" and local["auth"]["ssh_private_key"]

    # the checks can fail: a misspelt field is refused by the schema
    broken = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    broken["available_node_types"]["head"]["min_worker"] = 0
    with pytest.raises(ValidationError):
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(broken))


# --- two nodes started by hand ------------------------------------------------------------------


def test_search_trials_span_two_ray_nodes(synthetic_dir: Path, tmp_path: Path) -> None:
    """Head and worker node, 1 CPU each; a trial = 2 Train workers x 0.75 CPU + a 0.01 CPU driver,
    so its workers cannot share a node. run_search.py joins with --address and must report, for
    every trial, Train workers on both nodes."""
    temp = short_tmp("grc")
    env = ray_env(temp)
    gcs, dash, client, *ports = free_ports(9)
    address = f"127.0.0.1:{gcs}"
    storage = tmp_path / "storage"
    try:
        killed: list[str] = []
        with ray_nodes(env, tmp_path, killed) as start:
            t0 = time.monotonic()
            procs = [start(head_args(gcs, dash, client, ports, cpus=1))]
            wait_for_nodes(address, 1, env)
            procs.append(join_node(start, address, cpus=1))
            nodes = wait_for_nodes(address, 2, env)
            started_s = time.monotonic() - t0
            assert len(nodes) == 2, (tmp_path / "node0.log").read_text()[-2000:]

            t0 = time.monotonic()
            run = subprocess.run(
                [
                    sys.executable, str(ROOT / "run_search.py"), "--address", address,
                    "--data", str(synthetic_dir), "--storage", str(storage), "--name", "two_nodes",
                    "--cpus-per-worker", "0.75", "--num-samples", "2", *SEARCH_ARGS,
                ],
                env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
            )  # fmt: skip
            search_s = time.monotonic() - t0
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
            t0 = time.monotonic()
        stop_s = time.monotonic() - t0
        assert all(p.returncode is not None and not session_members(p.pid) for p in procs)  # all stopped
        board = pd.read_csv(storage / "two_nodes" / "leaderboard.csv")
        assert len(board) == 2 and (board["status"] == "TERMINATED").all(), board.to_string()
        assert (board["epochs_run"] == 1).all()
        for _, row in board.iterrows():
            assert set(str(row["worker_node_ids"]).split(",")) == set(nodes), row.to_dict()
            assert row["node_id"] in nodes
        print(
            f"\ntwo nodes up {started_s:.1f} s, 2 trials x 1 epoch {search_s:.1f} s, stop {stop_s:.1f} s, killed {killed}"
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_a_node_joining_a_running_search_raises_its_concurrency(synthetic_dir: Path, tmp_path: Path) -> None:
    """What an autoscaler does, by hand: the head fits one trial (2 CPUs; a trial = 2 x 0.75 CPU +
    0.01), the search starts with --pending-trials 0, and a second node joins once the first trial
    runs. The search must notice: a trial runs on the new node while another still runs."""
    from geopose_ray.tune.report import load_trials

    temp = short_tmp("grj")
    env = ray_env(temp)
    gcs, dash, client, *ports = free_ports(9)
    address = f"127.0.0.1:{gcs}"
    exp = tmp_path / "storage" / "joined"
    try:
        killed: list[str] = []
        with ray_nodes(env, tmp_path, killed) as start:
            start(head_args(gcs, dash, client, ports, cpus=2))
            (head,) = wait_for_nodes(address, 1, env)
            search = subprocess.Popen(
                [
                    sys.executable, str(ROOT / "run_search.py"), "--address", address,
                    "--data", str(synthetic_dir), "--storage", str(exp.parent), "--name", exp.name,
                    "--cpus-per-worker", "0.75", "--num-samples", "3", "--pending-trials", "0", *SEARCH_ARGS,
                ],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
            )  # fmt: skip
            deadline = time.monotonic() + 300
            while not list(exp.glob("*/params.json")):  # the first trial started
                assert search.poll() is None and time.monotonic() < deadline, search.communicate()[0][-5000:]
                time.sleep(0.5)
            join_node(start, address, cpus=2)
            (joined,) = set(wait_for_nodes(address, 2, env)) - {head}
            out = search.communicate(timeout=600)[0]
            assert search.returncode == 0, out[-5000:]
        records = load_trials(exp)
        assert len(records) == 3 and all(r.status == "TERMINATED" for r in records), out[-5000:]
        spans = {}
        for r in records:  # (start, end) in wall time, from Tune's own per-report timestamps
            first, last = r.history.iloc[0], r.history.iloc[-1]
            spans[r.trial_id] = (first["timestamp"] - first["time_total_s"], last["timestamp"])
        on_joined = [r.trial_id for r in records if joined in str(r.last("worker_node_ids"))]
        assert on_joined, [r.last("worker_node_ids") for r in records]
        overlapping = [
            (a, b)
            for a in on_joined
            for b in spans
            if a != b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
        ]
        assert overlapping, spans
        print(f"\njoined node ran {len(on_joined)} of 3 trials; overlapping: {overlapping}; killed {killed}")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
