"""`python -m geopose_ray.train`: one config, one process, no Ray; bad input exits 2 naming the file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from geopose_ray.checkpoint import load_model_from_checkpoint, load_state
from geopose_ray.errors import EXIT_BAD_INPUT, run_cli
from geopose_ray.train import load_config, main, parse_args


def write_yaml(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def small_space(tmp_path) -> dict:
    """A search-space file: the CLI trains its parameters' defaults plus its fixed values."""
    return {
        "scheduler": {"max_epochs": 1, "grace_period": 1, "reduction_factor": 2},
        "fixed": {
            "n_folds": 3,
            "crop": 64,
            "batch_size": 2,
            "max_train_samples": 4,
            "photo_aug": "none",
        },
        "parameters": {
            "encoder": {"type": "choice", "values": ["resnet18", "efficientnet-b0"], "default": "resnet18"},
            "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2, "default": 1e-3},
        },
    }


def test_trains_a_search_space_default_and_keeps_the_best_checkpoint(synthetic_dir, tmp_path, capsys):
    config = write_yaml(tmp_path / "space.yaml", small_space(tmp_path))
    out = tmp_path / "out"
    cache = str(tmp_path / "cache")
    assert main(["--config", config, "--data", str(synthetic_dir), "--cache", cache, "--out", str(out), "--fold", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("epoch 1/1") and "score" in lines[0]  # max_epochs of the space
    assert lines[-1].startswith("best score") and str(out) in lines[-1]
    state = load_state(out)
    assert state["epoch"] == 1
    assert state["config"]["fold"] == 1 and state["config"]["lr"] == pytest.approx(1e-3)
    model, cfg = load_model_from_checkpoint(out)
    assert cfg.model.encoder == "resnet18" and not model.training
    with torch.no_grad():
        pred = model(torch.rand(1, 3, 64, 64), torch.tensor([0.5]), torch.tensor([0]))
    assert pred["agl"].shape == (1, 1, 64, 64) and pred["direction"].shape == (1, 2)


def test_command_line_overrides_the_file(tmp_path):
    config = write_yaml(tmp_path / "flat.yaml", {"epochs": 7, "fold": 0, "lr": 0.01})
    cfg = load_config(parse_args(["--config", config, "--epochs", "2", "--fold", "3"]))
    assert (cfg.train.epochs, cfg.data.fold, cfg.optim.lr) == (2, 3, 0.01)
    assert load_config(parse_args(["--config", config])).train.epochs == 7


def _bad_input(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "doc, problem",
    [
        ({"lr": 1e-3, "learning_rate": 1e-3}, "learning_rate"),  # unknown key
        ({"optimizer": "lion"}, "lion"),
        ({"schedule": "poly"}, "poly"),
        ({"precision": "fp8"}, "fp8"),
        ({"geo_aug": "wild"}, "wild"),
        ({"epochs": 0}, "epochs"),
        (["not", "a", "mapping"], "mapping"),
    ],
)
def test_bad_config_exits_2_naming_the_file(tmp_path, capsys, doc, problem):
    config = write_yaml(tmp_path / "bad.yaml", doc)
    err = _bad_input(["--config", config, "--data", str(tmp_path)], capsys)
    assert config in err and problem in err


def test_missing_config_exits_2(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert missing in _bad_input(["--config", missing], capsys)


def test_bad_data_exits_2_naming_it(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", {"cache_dir": str(tmp_path / "cache"), "epochs": 1})
    missing = tmp_path / "no-data"
    assert str(missing) in _bad_input(["--config", config, "--data", str(missing)], capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "geopose_train.csv").write_text("this,is,not\nthe,right,table\n")
    (broken / "metadata.csv").write_text("id,city,gsd\n")
    assert "geopose_train.csv" in _bad_input(["--config", config, "--data", str(broken)], capsys)


def test_module_entry_point_exits_2_on_a_missing_config(tmp_path):
    missing = tmp_path / "missing.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "geopose_ray.train", "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_BAD_INPUT
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
