"""A user's first day: no secret on disk or screen (`redact`), experiments that do not collide and
record what made them (`tune/identity.py`), a dry run that is dry (no Ray, no download, nothing
written: `tune/plan.py`, `ensemble/plan.py`), and commands that fit: flag groups, defaults shown
(0 too), documented exit codes, console scripts. No Ray starts here: the dry runs run in
subprocesses that report which `ray` modules they loaded (none)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from geopose_ray import redact
from geopose_ray.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, HelpFormatter, InputError, run_cli
from geopose_ray.tune import identity, options
from geopose_ray.tune.capacity import TrialResources

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
SECRET, TOKEN = "s3cret", "t0ken"
DB_URL = f"postgresql+psycopg2://user:{SECRET}@db.example/geopose"
MLFLOW_URI = f"https://alice:{TOKEN}@mlflow.example/?token={TOKEN}x&experiment=1"


# --- secrets ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://user:s3cret@localhost/db", "postgresql://user:***@localhost/db"),
        (
            "postgresql+psycopg2://u:p@ss@h:5432/db?password=x&sslmode=require",
            "postgresql+psycopg2://u:***@h:5432/db?password=***&sslmode=require",
        ),
        ("mysql://user@host/db", "mysql://user@host/db"),  # a database's user name is no secret
        ("sqlite:////abs/optuna.db", "sqlite:////abs/optuna.db"),
        ("http://user:tok@mlflow:5000", "http://user:***@mlflow:5000"),
        ("https://TOKEN@host/x", "https://***@host/x"),  # a bare user of a web URI is a token
        ("https://h/?token=abc&x=1&sig=zz", "https://h/?token=***&x=1&sig=***"),
        ("s3://bucket/p?endpoint_override=http://x&secret_key=zz", "s3://bucket/p?endpoint_override=http://x&secret_key=***"),
        ("/a/local/path", "/a/local/path"),
        (None, None),
    ],
)
def test_urls_are_masked_and_everything_else_kept(url, masked):
    assert redact.mask_url(url) == masked


def test_free_text_is_masked_and_a_masked_url_recalls_the_real_one():
    line = f"error: {DB_URL}: cannot connect (see {MLFLOW_URI})."
    out = redact.mask_text(line)
    assert SECRET not in out and TOKEN not in out and out.endswith(".") and "db.example/geopose:" in out
    redact.remember(DB_URL, None)
    assert redact.recall(redact.mask_url(DB_URL)) == DB_URL
    assert redact.recall("sqlite:////x.db") == "sqlite:////x.db"  # nothing secret, nothing kept


def test_an_input_error_naming_a_url_prints_it_masked(capsys):
    def main(argv: list[str] | None) -> int:
        raise InputError(DB_URL, "cannot connect")

    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    err = capsys.readouterr().err
    assert e.value.code == EXIT_BAD_INPUT and err.count("\n") == 1 and SECRET not in err and "user:***@" in err


def _options_doc(tmp_path: Path, synthetic_dir: Path, **changes) -> tuple[dict, identity.Identity]:
    """Write the options file of an experiment on `synthetic_dir` and read it back."""
    opts = options.SearchOptions(space=str(SMOKE), data=str(synthetic_dir), storage=str(tmp_path / "st"), **changes)
    measured = options.measure_data(opts, synthetic_dir)
    space = options.resolve_space(opts, str(synthetic_dir), measured)
    ident = identity.identify(opts, synthetic_dir, measured)
    exp = options.resolve_experiment(opts, space)
    exp.dir.mkdir(parents=True, exist_ok=True)
    identity.write_options(exp, opts, space, TrialResources(), 1, ident)
    text = exp.options.read_text()
    assert SECRET not in text and TOKEN not in text
    return json.loads(text), ident


def test_the_options_file_masks_every_url_and_records_what_made_the_experiment(synthetic_dir, tmp_path):
    doc, ident = _options_doc(tmp_path, synthetic_dir, optuna_storage=DB_URL, mlflow=MLFLOW_URI)
    assert doc["optuna_storage"] == "postgresql+psycopg2://user:***@db.example/geopose"
    assert doc["mlflow"] == "https://alice:***@mlflow.example/?token=***&experiment=1"
    assert doc["optuna"] == {"storage": doc["optuna_storage"], "study": f"smoke-{ident.fingerprint[:8]}"}
    assert doc["fingerprint"] == ident.fingerprint and doc["fold_mode"] == "place"
    assert doc["folds"]["mode"] == "place" and doc["derived_keys"]["crop"] == 64
    assert any(line.startswith("crop") for line in doc["derived"])
    assert doc["sampler"] == {
        "name": "random",
        "requested": "auto",
        "source": "default",
        "reason": "auto: no model-based sampler has beaten random search on the bench at 4 trials yet "
        "(docs/SEARCH_VALUE.md)",
        "settings": {},
    }
    prov = doc["provenance"]
    assert prov["requirements_lock_sha256"] == hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()
    assert prov["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])


# --- experiments that do not collide ------------------------------------------------------------
def test_the_fingerprint_follows_data_space_set_folds_and_derived_defaults(synthetic_dir, tmp_path):
    def fingerprint(space: Path = SMOKE, data: Path = synthetic_dir, **changes) -> str:
        opts = options.SearchOptions(space=str(space), data=str(data), **changes)
        return identity.identify(opts, data, options.measure_data(opts, data)).fingerprint

    base = fingerprint()
    assert fingerprint() == base and len(base) == identity.FINGERPRINT_CHARS
    edited = tmp_path / "smoke.yaml"
    edited.write_text(SMOKE.read_text().replace("num_samples: 4", "num_samples: 7"))
    assert fingerprint(space=edited) != base  # the space file's content, not its name
    assert fingerprint(overrides={"n_folds": 3}) != base  # --set, and the folds it changes
    assert fingerprint(overrides={"epoch_samples": 64}) != base  # a derived default fixed instead
    link = tmp_path / "link"
    os.symlink(synthetic_dir, link)
    assert fingerprint(data=link) == base  # the same folder by another name
    other = shutil.copytree(synthetic_dir, tmp_path / "copy", ignore=shutil.ignore_patterns(".geopose_cache"))
    assert fingerprint(data=other) != base  # another data folder
    opts = options.SearchOptions(space=str(SMOKE))
    exp = options.resolve_experiment(opts, options.load_run_space(opts))
    assert options.optuna_study(opts, exp, base) == (exp.optuna_url, "smoke")  # its own SQLite file
    shared = options.SearchOptions(space=str(SMOKE), optuna_storage=DB_URL)
    assert options.optuna_study(shared, exp, base) == (DB_URL, f"smoke-{base[:8]}")


def test_resuming_another_fingerprint_is_refused_with_one_line(synthetic_dir, tmp_path):
    doc, ident = _options_doc(tmp_path, synthetic_dir)
    space = options.load_run_space(options.SearchOptions(space=str(SMOKE)))
    exp = options.resolve_experiment(options.SearchOptions(space=str(SMOKE), storage=str(tmp_path / "st")), space)
    identity.check_resumable(exp, space, ident.fingerprint)
    with pytest.raises(InputError, match=r"made with fingerprint .*: resume with the same ones, or start a new --name"):
        identity.check_resumable(exp, space, "f" * 16)
    doc.pop("fingerprint")
    exp.options.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="made before fingerprints"):
        identity.check_resumable(exp, space, ident.fingerprint)


def test_resuming_with_another_sampler_is_refused_with_one_line(synthetic_dir, tmp_path):
    """Tune restores a resumed search's pickled sampler whatever --sampler says: another name stops."""
    doc, ident = _options_doc(tmp_path, synthetic_dir)
    space = options.load_run_space(options.SearchOptions(space=str(SMOKE)))
    exp = options.resolve_experiment(options.SearchOptions(space=str(SMOKE), storage=str(tmp_path / "st")), space)
    identity.check_resumable(exp, space, ident.fingerprint, "random")
    identity.check_resumable(exp, space, ident.fingerprint)  # no sampler asked: not compared
    with pytest.raises(InputError, match=r"made with the random sampler, not tpe: .* resume with --sampler random"):
        identity.check_resumable(exp, space, ident.fingerprint, "tpe")
    doc.pop("sampler")  # made before the options file recorded a sampler: Optuna's TPE ran
    exp.options.write_text(json.dumps(doc))
    identity.check_resumable(exp, space, ident.fingerprint, "tpe")
    with pytest.raises(InputError, match=r"made before samplers were recorded \(with TPE\), not random"):
        identity.check_resumable(exp, space, ident.fingerprint, "random")


def test_the_plan_names_the_sampler_and_why(synthetic_dir, tmp_path):
    from geopose_ray.tune.plan import plan_search

    def line(**changes) -> str:
        opts = options.SearchOptions(space=str(SMOKE), data=str(synthetic_dir), storage=str(tmp_path / "st"), **changes)
        return next(x for x in plan_search(opts, ({"CPU": 2.0}, None)) if x.startswith("sampler:"))

    assert line() == (
        "sampler:    random  auto: no model-based sampler has beaten random search on the bench at 4 trials yet "
        "(docs/SEARCH_VALUE.md); every trial drawn at random (the defaults' first)"
    )
    assert line(sampler="tpe", num_samples=24) == (
        "sampler:    tpe  set by --sampler; multivariate, grouped, constant liar, 6 random startup trials"
    )
    assert line(sampler="gp", max_concurrent=1) == (
        "sampler:    gp  set by --sampler; 2 random startup trials; huber_delta drawn at random (conditional)"
    )
    assert not (tmp_path / "st").exists()


# --- a dry run that is dry ----------------------------------------------------------------------
@dataclass
class Run:
    code: int
    out: str
    err: str
    ray: list[str]  # the `ray` modules the process loaded


def dry(script: str, *args: str | Path, home: Path) -> Run:
    """`python <script> <args>` in a fresh process without RAY_ADDRESS, with a fake psycopg2 (the
    plan checks that the driver is installed, never connects): its exit code, output and the ray
    modules it imported."""
    argv = [str(ROOT / script), *map(str, args)]
    code = (
        "import json, runpy, sys, types\n"
        "sys.modules['psycopg2'] = types.ModuleType('psycopg2')\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__'); code = 0\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('RESULT ' + json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] == 'ray')]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["GEOPOSE_RAY_HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    *lines, last = out.stdout.rstrip("\n").split("\n")
    result, ray = json.loads(last.removeprefix("RESULT "))
    return Run(result, "\n".join(lines), out.stderr, ray)


def test_search_dry_run_starts_no_ray_writes_nothing_and_shows_no_secret(synthetic_dir, tmp_path):
    home, storage = tmp_path / "home", tmp_path / "st"
    run = dry("run_search.py", "--dry-run", "--data", synthetic_dir, "--storage", storage, "--optuna-storage",
              DB_URL, "--mlflow", MLFLOW_URI, home=home)  # fmt: skip
    assert run.code == 0 and run.ray == [], run.err
    assert SECRET not in run.out + run.err and TOKEN not in run.out + run.err
    assert "(this machine, read without starting Ray)" in run.out
    assert re.search(r"optuna: +postgresql\+psycopg2://user:\*\*\*@db\.example/geopose  \(study smoke-[0-9a-f]{8}\)", run.out)
    assert re.search(r"estimate: +~\d+ (s|min) wall time, a rough estimate", run.out)
    assert "ASHA grace 5, reduction factor 2.0; statistics re-measured every 5 epochs for the rungs" in run.out
    assert "\nsampler:    random  auto: no model-based sampler has beaten random search on the bench at 4 trials" in run.out
    assert not storage.exists() and not home.exists()  # no experiment folder, no weights cache
    resumed = dry("run_search.py", "--dry-run", "--resume", "--data", synthetic_dir, "--storage", storage, home=home)
    assert resumed.code == EXIT_BAD_INPUT and resumed.err.count("\n") == 1 and "before leak-free" in resumed.err


def test_the_storage_and_the_optuna_database_are_checked_before_ray(tmp_path):
    (tmp_path / "file").write_text("")
    options.check_storage(options.SearchOptions(space=str(SMOKE), storage=str(tmp_path / "new" / "folder")))
    with pytest.raises(InputError, match="cannot write experiments here"):
        options.check_storage(options.SearchOptions(space=str(SMOKE), storage=str(tmp_path / "file" / "x")))
    options.check_optuna_storage(options.SearchOptions(space=str(SMOKE), optuna_storage="sqlite:////x/o.db"))
    for url, words in (("not a url", "not a database URL"), ("nosuchdb://u:pw@h/d", "not a database URL")):
        with pytest.raises(InputError, match=words) as e:
            options.check_optuna_storage(options.SearchOptions(space=str(SMOKE), optuna_storage=url))
        assert "pw" not in redact.mask_text(str(e.value))


def test_the_dry_run_looks_for_hub_weights_without_downloading(tmp_path, monkeypatch):
    from geopose_ray.models import pretrained

    space = tmp_path / "space.yaml"
    space.write_text(SMOKE.read_text().replace("encoder_weights: null", "encoder_weights: imagenet"))
    opts = options.SearchOptions(space=str(space), weights_cache=str(tmp_path / "w"))
    run_space = options.load_run_space(opts)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: a missing file would be downloaded by the run only
    found = options.cached_weights(opts, run_space)
    assert set(found) == {("resnet18", "imagenet"), ("tu-resnet10t", "imagenet")} and not any(found.values())
    assert not (tmp_path / "w").exists()
    repo = pretrained.hub_repo("tu-resnet10t")  # a cached file, in the hub's layout
    snap = tmp_path / "w" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / pretrained.WEIGHTS_FILE).write_bytes(b"")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    assert options.cached_weights(opts, run_space)[("tu-resnet10t", "imagenet")] == snap / pretrained.WEIGHTS_FILE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline and missing: the run would stop, so does the plan
    with pytest.raises(InputError, match="resnet18"):
        options.cached_weights(opts, run_space)


def test_ensemble_dry_run_starts_no_ray_and_writes_nothing(synthetic_dir, tmp_path):
    import yaml

    storage = tmp_path / "st"
    entries = []
    for fold in (0, 1):
        ckpt = storage / "e" / f"ckpt{fold}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.pt").write_bytes(b"")  # a plan never loads weights
        config = {"fold": fold, "n_folds": 3, "data_dir": str(synthetic_dir)}
        (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
        entry = {"rank": 0, "config_id": "A", "fold": fold, "checkpoint": str(ckpt), "config": config}
        entries.append({**entry, "selection_fold": 0})  # fold 0: the search's own trial
    (storage / "e" / "members.json").write_text(json.dumps(entries))
    run = dry("run_ensemble.py", "--dry-run", "--storage", storage, "--name", "e", "--tta", "flip", home=tmp_path / "h")
    assert run.code == 0 and run.ray == [], run.err
    assert "2 checkpoints of 1 config(s): A folds [0, 1] (fold 0: the search's, test tiles only)" in run.out and "flip (4 view(s) per member)" in run.out
    assert "cache current" in run.out and re.search(r"estimate: +~\d+ (s|min) wall time", run.out)
    assert sorted(p.name for p in (storage / "e").iterdir()) == ["ckpt0", "ckpt1", "members.json"]


# --- commands that fit --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("outcome", "code"), [(0, 0), (None, 0), (1, 1), ("bad input", EXIT_BAD_INPUT), ("ctrl-c", EXIT_INTERRUPTED)]
)
def test_every_exit_code(outcome, code, capsys):
    def main(argv: list[str] | None) -> int | None:
        if outcome == "bad input":
            raise InputError("--flag", "not a flag value")
        if outcome == "ctrl-c":
            raise KeyboardInterrupt
        return outcome

    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    assert e.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == (1 if code in (EXIT_BAD_INPUT, EXIT_INTERRUPTED) else 0)


def test_a_search_with_unfinished_trials_exits_1(monkeypatch):
    from types import SimpleNamespace

    from geopose_ray.tune import launch

    monkeypatch.setattr(launch, "search_from_args", lambda args, embedded: SimpleNamespace(interrupted=True))
    assert launch.main([]) == 1
    monkeypatch.setattr(launch, "search_from_args", lambda args, embedded: SimpleNamespace(interrupted=False))
    assert launch.main([]) == 0


def test_help_shows_groups_defaults_including_0_and_exit_codes():
    from geopose_ray.ensemble import launch as ensemble_launch
    from geopose_ray.tune import launch

    text = launch.build_parser().format_help()
    for group in ("data:", "search:", "resources:", "storage:", "tracking and console:"):
        assert f"\n{group}\n" in text
    flat = " ".join(text.split())
    assert "validation fold of the search (default: 0)" in flat and "(default: 1)" in flat
    assert "130 interrupted" in flat and "returns 1: run the same command with --resume" in flat
    text = " ".join(ensemble_launch.build_parser().format_help().split())
    assert "members:" in text and "(default: 4)" in text and "130 interrupted" in text
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--rate", type=float, default=0.0, help="a rate")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--none", help="unset")
    shown = " ".join(p.format_help().split())
    assert "a rate (default: 0.0)" in shown and "a flag (default" not in shown and "unset (default" not in shown


def test_console_scripts_and_the_scripts_run_the_same_main():
    import importlib
    import importlib.util

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"geopose-search", "geopose-ensemble"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    for script, module in (("run_search.py", "geopose_ray.tune.launch"), ("run_ensemble.py", "geopose_ray.ensemble.launch")):
        spec = importlib.util.spec_from_file_location(script[:-3], ROOT / script)
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        assert cli.main is importlib.import_module(module).main


@pytest.mark.parametrize(("built", "expects"), [(0.14, True), (0.26, False)])
def test_the_plan_of_a_sparse_city_gives_the_measured_figure_of_such_data(built, expects):
    """Where the search is known to fall short (sparse, tall data), the plan says so with the
    figure measured on a held-out set like it."""
    from types import SimpleNamespace

    from geopose_ray.data.stats import DataStats
    from geopose_ray.tune import plan

    data = DataStats(48, 48, tile_px=256, disp_p95=65.0, disp_max=85.0, built=built, mag_rms=8.6)
    lines = plan._data_lines(SimpleNamespace(derived_lines=["crop 160"]), data)
    assert any(line.startswith("derived:") for line in lines)
    assert any(line.startswith("expect:") and "0.822 in 57 min" in line for line in lines) == expects


@pytest.mark.parametrize(("trials", "expects"), [(6, True), (64, False)])
def test_the_plan_of_a_small_search_says_the_default_config_is_the_likely_result(trials, expects):
    """At a budget where the search has never beaten its default config, the plan says so."""
    from types import SimpleNamespace

    from geopose_ray.tune import plan

    lines = plan._budget_lines(SimpleNamespace(num_samples=trials))
    assert any(f"at {trials} trials the likely result is the default config" in line for line in lines) == expects
