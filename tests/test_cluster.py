"""Multi-node Ray for real, on this one machine (RAY_NOTES section 6): the cluster files pass
Ray's own config checks; two `ray start` nodes run the smoke search with trials spanning both;
`ray up` / `ray job submit` / `ray down` drive cluster.local.yaml over ssh to 127.0.0.1.

By hand, under the lock: `flock /tmp/geopose_ray.lock .venv/bin/python -m pytest -q tests/test_cluster.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
SEARCH_ARGS = ["--max-epochs", "1", "--workers-per-trial", "2", "--refit-top", "0"]  # + --num-samples


def ray_env(temp_dir: Path) -> dict[str, str]:
    """Environment of every Ray process a test starts: no token auth (RAY_NOTES 0), a private
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
        with open(log_dir / f"node{len(procs)}.log", "wb") as out:
            cmd = [RAY, "start", "--block", *args]
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(proc)
        return procs[-1]

    try:
        yield start
    finally:
        killed.extend(stop_sessions(procs))


def node_args(ports: list[int], cpus: int) -> list[str]:
    """Every port explicit: two raylets on one machine must not both take Ray's defaults."""
    nm, om, agent, agent_grpc, env_agent, metrics = ports
    return [
        "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0", f"--node-manager-port={nm}",
        f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", "--object-store-memory=100000000",
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
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def test_cluster_files_pass_rays_config_checks() -> None:
    import ray
    from jsonschema import ValidationError

    from geopose_ray.tune.driver import TrialResources

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
    gcs, dash, client, *ports = free_ports(15)
    address = f"127.0.0.1:{gcs}"
    storage = tmp_path / "storage"
    try:
        killed: list[str] = []
        with ray_nodes(env, tmp_path, killed) as start:
            t0 = time.monotonic()
            head = [
                "--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}", f"--ray-client-server-port={client}", *node_args(ports[:6], 1),
            ]  # fmt: skip
            procs = [start(head)]
            wait_for_nodes(address, 1, env)
            procs.append(start([f"--address={address}", *node_args(ports[6:12], 1)]))
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


# --- the cluster launcher: ray up / ray job submit / ray down with the local provider -----------

SSHD = "/usr/sbin/sshd"
NS_INIT = """set -e
ip link set lo up
mount -t overlay overlay -o "lowerdir=$HOME,upperdir=$BOX/upper,workdir=$BOX/work" "$HOME"
mount --bind "$BOX" "$BOX/tmp/$(basename "$BOX")"
mount --rbind "$BOX/tmp" /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd
exec "$SSHD" -D -e -f "$BOX/sshd_config"
"""
# The namespace: private loopback (port 22 and Ray's ports collide with nobody), private PIDs
# (`ray stop` sees only this cluster; killing the init kills everything inside), $HOME as an
# overlay whose writes land in BOX/upper (~/.bashrc, ~/geopose_ray, ~/ray_bootstrap_*), and a
# private /tmp in which BOX keeps its own path.


def has_ssh_tools() -> bool:
    return Path(SSHD).exists() and shutil.which("rsync") is not None


def write_ssh_box(box: Path) -> None:
    """Host and user keys, a private sshd config (127.0.0.1 only, key-only root login, its own
    authorized_keys), the overlay folders and the private ~/.bashrc the setup commands extend."""
    for sub in ("upper", "work", f"tmp/{box.name}"):
        (box / sub).mkdir(parents=True)
    for key in ("host_key", "key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(box / key)], check=True)
    shutil.copy(box / "key.pub", box / "authorized_keys")
    (box / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort 22\nHostKey {box / 'host_key'}\nPidFile none\n"
        f"AuthorizedKeysFile {box / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    # the project's own venv stands in for `make setup` on the "remote" (no pip install in tests)
    (box / "upper" / ".bashrc").write_text(f"export GEOPOSE_RAY_VENV={sys.prefix}\n")


class Namespace:
    """sshd as the init of private namespaces; `run` executes a command inside them."""

    def __init__(self, box: Path, env: dict[str, str]):
        self.box, self.env = box, env
        ns_env = {**env, "BOX": str(box), "SSHD": SSHD, "HOME": str(Path.home())}
        self.log = open(box / "sshd.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--", "bash", "-c", NS_INIT],
            env=ns_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.init_pid = self._child_pid()

    def _child_pid(self, timeout_s: float = 10) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            children = [pid for pid, (_, ppid, _) in proc_stats().items() if ppid == self.proc.pid]
            if children:
                return children[0]
            time.sleep(0.1)
        raise RuntimeError(f"namespace did not start: {(self.box / 'sshd.log').read_text()[-1000:]}")

    def run(self, cmd: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        nsenter = ["nsenter", "-t", str(self.init_pid), "-p", "-n", "-m", f"--wd={ROOT}", "--"]
        out = subprocess.run(nsenter + cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd[:4])} -> {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
            )
        return out

    def wait_for_ssh(self, timeout_s: float = 30) -> None:
        ssh = ["ssh", "-i", str(self.box / "key"), "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes",
               "-o", f"UserKnownHostsFile={os.devnull}", "root@127.0.0.1", "true"]  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while self.run(ssh, timeout=30, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"sshd not reachable: {(self.box / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def processes(self) -> list[str]:
        return self.run(["ps", "-e", "-o", "comm="], timeout=30).stdout.split()

    def stop(self) -> None:
        """SIGKILL the namespace's init: the kernel then kills every process inside it."""
        if self.proc.poll() is None:
            os.kill(self.init_pid, signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


def namespaces_work() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        return False
    probe = ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--", "ip", "link", "set", "lo", "up"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def test_ray_up_job_submit_ray_down_local_provider(synthetic_dir: Path) -> None:
    """cluster.local.yaml as written (own key and cluster name only) through the real launcher;
    in the namespaces `ray down`'s machine-wide `ray stop` sees only this cluster, and the real
    ~/.bashrc, authorized_keys and sshd config are never touched (checked at the end)."""
    if not namespaces_work():
        pytest.skip("needs root with unshare/nsenter (private PID, mount and network namespaces)")
    if not has_ssh_tools():  # .ci/run installs them
        pytest.skip("needs openssh-server and rsync: apt-get install -y openssh-server rsync")
    home_files = sorted(p.name for p in Path.home().iterdir())
    bashrc = Path.home() / ".bashrc"
    bashrc_before = bashrc.read_bytes() if bashrc.exists() else None
    box = short_tmp("grup")
    ns = None
    try:
        write_ssh_box(box)
        shutil.copytree(synthetic_dir, box / "data")
        config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
        config["cluster_name"] = f"geopose-test-{os.getpid()}"
        config["auth"]["ssh_private_key"] = str(box / "key")
        (box / "cluster.yaml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in ray_env(box).items() if k != "RAY_TMPDIR"}  # /tmp is private in there
        ns = Namespace(box, env)
        ns.wait_for_ssh()
        cfg = str(box / "cluster.yaml")
        timings = {}
        t0 = time.monotonic()
        ns.run([RAY, "up", "-y", cfg], timeout=600)
        timings["ray up"] = time.monotonic() - t0
        assert "raylet" in ns.processes()
        t0 = time.monotonic()
        job = ns.run(
            [
                RAY, "job", "submit", "--address", "http://127.0.0.1:8265", "--",
                "python", str(Path.home() / "geopose_ray" / "run_search.py"), "--data", str(box / "data"), "--storage",
                str(box / "storage"), "--name", "up", "--cpus-per-worker", "0.5", "--num-samples", "1",
                *SEARCH_ARGS,
            ],
            timeout=900,
        )  # fmt: skip
        timings["job"] = time.monotonic() - t0
        assert "succeeded" in job.stdout.lower(), job.stdout[-3000:]
        board = pd.read_csv(box / "storage" / "up" / "leaderboard.csv")
        assert len(board) == 1 and (board["status"] == "TERMINATED").all(), board.to_string()
        # the job ran the rsynced checkout on the cluster, set up by the file's setup commands
        assert (box / "upper" / "geopose_ray" / "run_search.py").is_file()
        assert "geopose_ray cluster" in (box / "upper" / ".bashrc").read_text()
        t0 = time.monotonic()
        ns.run([RAY, "down", "-y", cfg], timeout=300)
        timings["ray down"] = time.monotonic() - t0
        left = [p for p in ns.processes() if p in ("raylet", "gcs_server")]
        assert not left, f"ray down left {left} running (is `ray` on the login shell's PATH?)"
        print("\n" + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    finally:
        if ns is not None:
            ns.stop()
        shutil.rmtree(box, ignore_errors=True)
    assert sorted(p.name for p in Path.home().iterdir()) == home_files
    assert (bashrc.read_bytes() if bashrc.exists() else None) == bashrc_before
