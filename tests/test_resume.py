"""A search whose driver is killed mid-run, then `--resume`: finished trials are not run again,
no process outlives the driver, and the Optuna study holds every trial once (a subprocess run of
run_search.py; slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from test_search import ROOT, SMOKE_SPACE, write_space

from geopose_ray import experiment


# --- driver killed mid-search, then --resume ----------------------------------------------------
def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, start time) for every live (not zombie) process."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    table[int(d.name)] = (int(fields[1]), int(fields[3]), fields[19])
            except (OSError, IndexError, ValueError):
                continue
    return table


def _descendants(root: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, (pp, _, _) in table.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def _kill_leftovers(started: dict[int, str], sid: int) -> list[int]:
    """SIGKILL what the killed driver left: its recorded descendants and members of its session,
    each only if it is still the same process (same start time)."""
    table = _proc_table()
    ours = {p for p, (_, s, _) in table.items() if s == sid} | set(started)
    killed = []
    for pid in ours:
        if pid in table and (pid not in started or table[pid][2] == started[pid]):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def _finished_trials(exp: Path) -> list[Path]:
    done = []
    for result in exp.glob("trial_*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("done"):
            done.append(result.parent)
    return done


@pytest.mark.fault
@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(synthetic_dir, tmp_path):
    space = write_space(tmp_path, SMOKE_SPACE.replace("num_samples: 4", "num_samples: 3"), "fault")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(GEOPOSE_RAY_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled")
    args = [sys.executable, str(ROOT / "run_search.py"), "--space", str(space), "--data", str(synthetic_dir)]
    args += ["--storage", str(tmp_path / "st"), "--cpus-per-worker", "0.5", "--refit-top", "0"]
    exp = tmp_path / "st" / "fault"
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while not _finished_trials(exp) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert driver.poll() is None, "the search ended before it could be interrupted"
        finished = _finished_trials(exp)
        assert finished, "no trial finished in time"
        table = _proc_table()
        started = {p: table[p][2] for p in _descendants(driver.pid, table)}
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(30)
        log.close()
        leftovers = _kill_leftovers(started, driver.pid)
        time.sleep(1.0)
        leftovers += _kill_leftovers(started, driver.pid)  # anything the dying ones started meanwhile
    print(
        f"killed driver {driver.pid}; {len(started)} descendants, {len(set(leftovers))} left over and killed"
    )
    time.sleep(1.0)
    table = _proc_table()
    assert not [p for p, start in started.items() if p in table and table[p][2] == start], "orphans survived"
    kept = {d.name: (d / "result.json").read_bytes() for d in finished}
    ckpts = {
        d.name: sorted(p.name for p in (tmp_path / "st" / f"fault-{d.name[6:]}").iterdir()) for d in finished
    }

    with (tmp_path / "resume.log").open("w") as log:
        rc = subprocess.run(
            [*args, "--resume"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=400
        )
    out = (tmp_path / "resume.log").read_text()
    assert rc.returncode == 0, out[-3000:]
    board = pd.read_csv(exp / experiment.LEADERBOARD)
    assert len(board) == 3 and board["trial_id"].is_unique  # the searcher did not start extra trials
    assert (board["status"] == "TERMINATED").all()
    for name, before in kept.items():  # finished trials were not run again
        assert (exp / name / "result.json").read_bytes() == before
        assert sorted(p.name for p in (tmp_path / "st" / f"fault-{name[6:]}").iterdir()) == ckpts[name]
    for tid in board["trial_id"]:
        hist = pd.read_json(exp / f"trial_{tid}" / "result.json", lines=True)
        assert hist["epoch"].max() == board.set_index("trial_id").loc[tid, "epochs_run"]
    assert "trials: 3" in out
    # the Optuna study lives in the experiment folder and holds every trial once, finished
    study = optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp / experiment.OPTUNA_DB}")
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials), study.trials
    importances = json.loads((exp / experiment.IMPORTANCES).read_text())
    assert importances["trials"] == 3
