"""The cluster launcher for real: `ray up` / `ray job submit` / `ray down` drive
cluster.local.yaml (Ray's `local` provider) over ssh to an sshd on 127.0.0.1, inside private
namespaces so nothing outside the test is touched.

By hand, under the lock: `flock /tmp/geopose_ray.lock .venv/bin/python -m pytest -q tests/test_cluster_launcher.py`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers_cluster import RAY, ROOT, SEARCH_ARGS, proc_stats, ray_env, short_tmp

pytestmark = pytest.mark.cluster

# --- the cluster launcher: ray up / ray job submit / ray down with the local provider -----------

SSHD = "/usr/sbin/sshd"
NS_INIT = """set -e
ip link set lo up
mount -t overlay overlay -o "lowerdir=$HOME,upperdir=$BOX/upper,workdir=$BOX/work" "$HOME"
mount --bind "$BOX" "$BOX/tmp/$(basename "$BOX")"
for keep in $KEEP; do  # a checkout or venv under /tmp stays visible at its own path
    mkdir -p "$BOX/tmp/${keep#/tmp/}"
    mount --bind "$keep" "$BOX/tmp/${keep#/tmp/}"
done
mount --rbind "$BOX/tmp" /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd
exec "$SSHD" -D -e -f "$BOX/sshd_config"
"""
# The namespace: private loopback (port 22 and Ray's ports collide with nobody), private PIDs
# (`ray stop` sees only this cluster; killing the init kills everything inside), $HOME as an
# overlay whose writes land in BOX/upper (~/.bashrc, ~/geopose_ray, ~/ray_bootstrap_*), and a
# private /tmp in which BOX keeps its own path (and so do the checkout and the venv, when they lie
# under /tmp: a fresh clone there would vanish otherwise).


def kept_under_tmp() -> str:
    """The checkout and the venv when under /tmp (outermost only), space-separated for NS_INIT."""
    paths = sorted({p for p in (ROOT.resolve(), Path(sys.prefix).resolve()) if p.is_relative_to("/tmp")})
    outer = [p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)]
    assert all(" " not in str(p) for p in outer), outer
    return " ".join(map(str, outer))


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
        ns_env = {**env, "BOX": str(box), "SSHD": SSHD, "HOME": str(Path.home()), "KEEP": kept_under_tmp()}
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
