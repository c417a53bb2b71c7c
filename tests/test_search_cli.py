"""`run_search.py` as a user runs it, without Ray: bad input is exit 2 with one line naming the
file or flag, and nothing is written. The spaces are test_search's."""

from __future__ import annotations

import os
import subprocess
import sys

from test_search import PLAIN_SPACE, ROOT, write_space


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run_search.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    bad = write_space(tmp_path, PLAIN_SPACE.replace("lr:", "learning_rate:"), "bad")
    out = run_cli("--space", str(bad), "--storage", str(tmp_path / "s"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and str(bad) in out.stderr and "learning_rate" in out.stderr
    out = run_cli("--space", str(write_space(tmp_path, PLAIN_SPACE)), "--folds", "0,x")
    assert out.returncode == 2 and "--folds" in out.stderr and out.stderr.count("\n") == 1
    for flags, named in (
        (["--set", "init_checkpoint=/no/ckpt"], "/no/ckpt"),
        (["--max-concurrent", "0"], "--max"),
    ):
        out = run_cli(
            "--space", str(write_space(tmp_path, PLAIN_SPACE)), *flags, "--storage", str(tmp_path / "s")
        )
        assert out.returncode == 2 and named in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "s").exists()


def test_cli_mlflow_without_the_package_exits_2(tmp_path):
    """`--mlflow` imports mlflow only when given; without the package: one line, exit 2, no Ray."""
    hide = "sys.modules['mlflow'] = None"  # as if mlflow were not installed: importing it raises
    argv = [str(ROOT / "run_search.py"), "--space", str(write_space(tmp_path, PLAIN_SPACE))]
    argv += ["--storage", str(tmp_path / "s"), "--mlflow", "sqlite:///x.db"]
    code = f"import runpy, sys; {hide}; sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--mlflow" in out.stderr and "pip install mlflow" in out.stderr
    assert not (tmp_path / "s").exists()
