"""Helpers of the cluster tests (test_cluster.py, test_cluster_launcher.py): private Ray
environments, free ports, `ray start` nodes as process sessions stopped by PID, and the cluster
files prepared as Ray's launcher prepares them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
SEARCH_ARGS = ["--max-epochs", "1", "--workers-per-trial", "2", "--refit-top", "0"]  # + --num-samples


def ray_env(temp_dir: Path) -> dict[str, str]:
    """Environment of every Ray process a test starts: no token auth (docs/LIBRARIES.md, 'Ray: environment'), a private
    temp dir (sessions and the `ray_current_cluster` address file stay out of /tmp/ray)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST")}
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TMPDIR=str(temp_dir),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def short_tmp(prefix: str) -> Path:
    """A short folder under /tmp: Ray's unix sockets live below it (107-byte path limit)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def proc_stats() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, session id) of every process, from /proc (no psutil here:
    Ray vendors it, so it imports only after `import ray`)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (fields[0], int(fields[1]), int(fields[3]))
    return stats


def session_members(sid: int) -> list[int]:
    """Live PIDs still in session `sid` (setsid makes a node's pid its session id)."""
    return [pid for pid, (state, _, s) in proc_stats().items() if s == sid and pid != sid and state != "Z"]


def stop_sessions(procs: list[subprocess.Popen], grace_s: float = 60.0) -> list[str]:
    """SIGTERM every `ray start --block` process at once (each stops its own raylet and GCS),
    wait, then SIGKILL by PID whatever is left in their sessions and wait for it to go.
    Returns the names of the processes that had to be killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    killed = []
    for pid in wait_gone(procs, 10):
        with suppress(OSError):
            killed.append(Path(f"/proc/{pid}/comm").read_text().strip())
            os.kill(pid, signal.SIGKILL)
    wait_gone(procs, 10)
    return killed


def wait_gone(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Waits until the sessions of `procs` are empty; returns the PIDs still there at the end."""
    deadline = time.monotonic() + timeout_s
    while (left := [pid for p in procs for pid in session_members(p.pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@contextmanager
def ray_nodes(
    env: dict[str, str], log_dir: Path, killed: list[str]
) -> Iterator[Callable[[list[str]], subprocess.Popen]]:
    """Yields `start(args)`: one more `ray start --block` node in its own session. Every node
    started is stopped (by PID) on exit; `killed` gets the names of stragglers killed."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        log = log_dir / f"node{len(procs)}.log"
        with open(log, "wb") as out:
            cmd = [RAY, "start", "--block", *args]
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc.log_path = log  # read by `join_node`
        procs.append(proc)
        return procs[-1]

    try:
        yield start
    finally:
        killed.extend(stop_sessions(procs))


def join_node(
    start: Callable[[list[str]], subprocess.Popen], address: str, cpus: int, attempts: int = 3
) -> subprocess.Popen:
    """One more `ray start --address` node, launched again on fresh ports when it fails: on a
    loaded machine a raylet can miss Ray's fixed 30 s registration wait (`ray start` then exits
    with "The current node timed out during startup"), and an autoscaler would launch it again."""
    for _ in range(attempts):
        proc = start([f"--address={address}", *node_args(free_ports(6), cpus)])
        while proc.poll() is None:
            if "Ray runtime started" in proc.log_path.read_text(errors="replace"):
                return proc
            time.sleep(0.5)
    raise AssertionError(f"no node joined in {attempts} attempts: {proc.log_path.read_text()[-2000:]}")


def node_args(ports: list[int], cpus: int) -> list[str]:
    """Every port explicit: two raylets on one machine must not both take Ray's defaults."""
    nm, om, agent, agent_grpc, env_agent, metrics = ports
    return [
        "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0", f"--node-manager-port={nm}",
        f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", "--object-store-memory=100000000",
    ]  # fmt: skip


def head_args(gcs: int, dash: int, client: int, ports: list[int], cpus: int) -> list[str]:
    """`ray start` arguments of a head node with the dashboard on (ASHA stops need it)."""
    return [
        "--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--ray-client-server-port={client}", *node_args(ports, cpus),
    ]  # fmt: skip


WAIT_NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while True:
    alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(alive))
"""


def wait_for_nodes(address: str, n: int, env: dict[str, str], timeout_s: float = 90) -> list[str]:
    """Node ids of the cluster once `n` nodes are alive (a client of its own, not this process)."""
    out = subprocess.run(
        [sys.executable, "-c", WAIT_NODES, address, str(n), str(timeout_s)],
        env=env, capture_output=True, text=True, timeout=timeout_s + 60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    alive = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(alive) >= n, f"{len(alive)} of {n} nodes alive after {timeout_s} s"
    return alive


# --- the cluster files --------------------------------------------------------------------------


def prepared(path: Path) -> dict:
    """The config as `ray up` sees it before contacting the provider: defaults merged, schema checked."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def max_resources(config: dict) -> dict[str, float]:
    """What the autoscaler could reach: the head plus every worker type at its max_workers."""
    total: dict[str, float] = {}
    for name, node in config["available_node_types"].items():
        count = 1 if name == config["head_node_type"] else node.get("max_workers", 0)
        for key, value in node.get("resources", {}).items():
            total[key] = total.get(key, 0) + count * value
    return total
