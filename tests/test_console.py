"""The console: one line per finished trial and Ray's terse status table (`console`, `tune/progress`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_search import PLAIN_SPACE, write_space

from geopose_ray.tune.space import load_space

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


def test_console_trial_lines_and_terse_status_table(tmp_path, monkeypatch, capsys):
    """One line per finished trial (search, ASHA-stopped, refit, errored), and Ray's status table
    through a CLIReporter only once `console.setup` chose Tune's terse output engine."""
    from types import SimpleNamespace

    from ray import tune

    from geopose_ray import console
    from geopose_ray.tune import progress, tuner

    space = load_space(write_space(tmp_path, PLAIN_SPACE))
    assert progress.columns(space) == ["agl_loss", "lr"]  # huber_delta is conditional
    lines = tuner.TrialLines(space.searched(), max_epochs=2)

    def trial(tid: str, config: dict, scores: list[float], tta: float | None = None) -> SimpleNamespace:
        stats = {"epoch": {"max": len(scores)}, "score": {"max": max(scores)}} if scores else {}
        last = {} if tta is None else {"score_tta": tta}
        return SimpleNamespace(trial_id=tid, config=config, metric_analysis=stats, last_result=last)

    a1 = {"agl_loss": "mse", "lr": 0.00123456, "crop": 64}
    lines.on_trial_complete(0, [], trial("a1", a1, [0.1, 0.3], tta=0.41234))
    lines.on_trial_complete(0, [], trial("b2", {"agl_loss": "huber", "huber_delta": 2.5, "lr": 0.1}, [-2e8]))
    refit_cfg = {
        "refit_configs": [{"agl_loss": "mse", "lr": 0.01, "fold": 0}],
        "member": {"config_rank": 0, "fold": 2},
    }
    lines.on_trial_complete(0, [], trial("c_00001", refit_cfg, [0.2, 0.25]))
    lines.on_trial_error(0, [], trial("d4", {"agl_loss": "mse", "lr": 0.1}, []))
    assert capsys.readouterr().out.splitlines() == [
        "trial a1  agl_loss=mse lr=0.001235  epochs 2/2  best 0.3  with TTA 0.4123  finished",
        "trial b2  agl_loss=huber huber_delta=2.5 lr=0.1  epochs 1/2  best -2e+08  stopped by ASHA",
        "trial c_00001  refit #0 fold 2 agl_loss=mse lr=0.01  epochs 2/2  best 0.25  finished",
        "trial d4  agl_loss=mse lr=0.1  epochs 0/2  best -  ERROR (traceback above)",
    ]
    monkeypatch.setenv(console.LEGACY_OUTPUT_ENV, "1")
    full = tuner.run_config_kwargs(space.searched(), 2, ["lr"], str(tmp_path))
    assert set(full) == {"callbacks", "storage_path", "storage_filesystem"}
    assert full["storage_path"] == str(tmp_path) and full["storage_filesystem"] is None  # a local folder
    monkeypatch.setenv(console.LEGACY_OUTPUT_ENV, "0")
    terse = tuner.run_config_kwargs(space.searched(), 2, ["lr"], str(tmp_path))
    assert terse["verbose"] == 1 and isinstance(terse["progress_reporter"], tune.CLIReporter)
    assert console.setup(verbose=True) == {"log_to_driver": True}  # Ray's full console, untouched


def test_dry_run_prints_the_plan_and_writes_nothing(synthetic_dir, tmp_path):
    """The plan on a given cluster size (a 4-CPU one here); no Ray: see tests/test_dry_run.py."""
    from geopose_ray.tune import options, plan

    storage = tmp_path / "storage"
    opts = options.SearchOptions(space=str(SMOKE), data=str(synthetic_dir), storage=str(storage), refit_top=2)
    text = "\n".join(plan.plan_search(opts, ({"CPU": 4.0}, None)))
    tiles = len(list((synthetic_dir / "train").glob("*_RGB.j2k")))
    assert f"({tiles} train /" in text and "smoke.yaml" in text and "encoder, agl_loss" in text
    assert "1 Train worker(s) x {'CPU': 0.95}" in text
    assert "4 trial(s) at once" in text  # a 4-CPU cluster: 4 x (0.95 + 0.01)
    # the fixture's folds show fewer than 5 places of a city each: two refit folds, and the
    # search's own trials join for the test tiles
    assert re.search(r"refits: +2 configs \((up to|as many as hold) 5 places per city out of fold\) "
                     r"on fold\(s\) \[1, 2\] \(not the search's fold 0", text), text
    assert "then other models its fold cannot tell from it" in text  # refit_choice's rule
    assert "+ the search's full-budget trials on fold 0, for the test tiles only" in text
    assert f"-> {storage / 'smoke' / 'members.json'}" in text and "estimate:   ~" in text
    assert not storage.exists()


@pytest.mark.parametrize(
    ("trials", "grace", "max_epochs", "want"),
    [
        (4, 5, 20, 4 * 5 + 2 * 5 + 1 * 10),  # make search: 4 trials, rungs at 5 and 10
        (4, 11, 45, 4 * 11 + 2 * 11 + 1 * 22 + 1 * 1),  # heldout-512-low's 89, as measured (SEARCH_VALUE)
        (1, 5, 100, 100),  # a lone trial is never cut: the plan once counted 16 of its 100 epochs
        (6, 5, 20, 6 * 5 + 3 * 5 + 1.5 * 10),
        (0, 5, 20, 0),
    ],
)
def test_the_plan_counts_at_least_one_trial_to_the_end(trials, grace, max_epochs, want):
    from geopose_ray.tune import plan

    assert plan.asha_epochs(trials, grace, 2, max_epochs) == pytest.approx(want)
