"""Ensemble members, the CLI's handling of bad input, and the whole job end to end on the
synthetic set (Ray Data actors -> OOF blend fit -> validated, scored submission)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from geopose_ray.data.cache import CachedSample
from geopose_ray.ensemble import members as ms
from geopose_ray.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("run_ensemble", ROOT / "run_ensemble.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_out_naming_an_archive_puts_the_archive_exactly_there(tmp_path):
    from geopose_ray.ensemble.launch import output_paths as paths

    assert paths(tmp_path / "ens") == (tmp_path / "ens", None)
    assert paths(tmp_path / "sub.tar.gz") == (tmp_path / "sub_work", tmp_path / "sub.tar.gz")


def _fake_checkpoint(folder: Path, config: dict | None = None) -> Path:
    """A folder that looks like a checkpoint to member selection (no weights needed there)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.pt").write_bytes(b"")
    (folder / "config.yaml").write_text(yaml.safe_dump(config or {}))
    return folder


def _entry(rank: int, cid: str, fold: int, ckpt: str, score: float = 0.5) -> dict:
    return {
        "rank": rank,
        "config_id": cid,
        "fold": fold,
        "trial_id": f"{cid}-{fold}",
        "score": score,
        "checkpoint": ckpt,
        "config": {"fold": fold, "n_folds": 3},
    }


def _experiment(storage: Path, name: str, entries: list[dict] | str) -> Path:
    exp = storage / name
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "members.json").write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return exp


def test_read_members_keeps_top_k_configs_with_all_their_folds(tmp_path):
    for name in ("a0", "a1", "b0", "c0"):
        _fake_checkpoint(tmp_path / "exp" / name)
    entries = [
        _entry(1, "B", 0, "b0"),
        _entry(0, "A", 0, "a0"),
        _entry(0, "A", 1, "a1"),
        _entry(2, "C", 0, "c0"),
    ]
    _experiment(tmp_path, "exp", entries)
    top2 = ms.read_members(tmp_path, "exp", top_k=2)
    assert sorted((m.config_id, m.fold) for m in top2) == [("A", 0), ("A", 1), ("B", 0)]
    assert all(m.checkpoint.is_absolute() and (m.checkpoint / "state.pt").is_file() for m in top2)
    groups = ms.group_by_config(top2)
    assert [cid for cid, _ in groups] == ["A", "B"] and sorted(groups[0][1]) == [0, 1]


def test_configs_are_chosen_by_their_out_of_fold_score_not_by_search_rank(tmp_path):
    for name in ("a1", "b1", "c1"):
        _fake_checkpoint(tmp_path / "exp" / name)
    entries = [
        {**_entry(0, "A", 1, "a1"), "config_oof_score": 0.41},  # the search's best, worse out of fold
        {**_entry(1, "B", 1, "b1"), "config_oof_score": 0.63},
        {**_entry(2, "C", 1, "c1"), "config_oof_score": None},  # no accumulators: by rank, after
    ]
    _experiment(tmp_path, "exp", entries)
    assert [m.config_id for m in ms.read_members(tmp_path, "exp", top_k=1)] == ["B"]
    assert sorted(m.config_id for m in ms.read_members(tmp_path, "exp", top_k=2)) == ["A", "B"]
    order = ms.by_oof_score(ms.read_members(tmp_path, "exp", top_k=3))
    assert [c for c, _ in order] == ["B", "A", "C"] and order[0][1] == 0.63


def test_latest_experiment_is_the_newest_with_members(tmp_path):
    import os

    old = _experiment(tmp_path, "old", "[]")
    _experiment(tmp_path, "new", "[]")
    (tmp_path / "newest-without-members").mkdir()
    os.utime(old / "members.json", (1, 1))
    assert ms.latest_experiment(tmp_path) == "new"
    with pytest.raises(InputError, match="no experiment"):
        ms.latest_experiment(tmp_path / "empty")


def test_explicit_checkpoints_group_by_config_except_fold(tmp_path):
    a0 = _fake_checkpoint(tmp_path / "a0", {"encoder": "resnet18", "fold": 0})
    a1 = _fake_checkpoint(tmp_path / "a1", {"encoder": "resnet18", "fold": 1})
    b0 = _fake_checkpoint(tmp_path / "b0", {"encoder": "resnet34", "fold": 0})
    members = ms.members_from_checkpoints([a0, a1, b0])
    assert [(m.config_id, m.fold) for m in members] == [("config0", 0), ("config0", 1), ("config1", 0)]
    dup = _fake_checkpoint(tmp_path / "dup", {"encoder": "resnet18", "fold": 1})
    with pytest.raises(InputError, match="same fold"):
        ms.members_from_checkpoints([a0, a1, dup])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[{", "cannot parse JSON"),
        ('[{"rank": NaN, "config_id": "A", "fold": 0, "checkpoint": "a0", "config": {}}]', "NaN"),
        ('[{"rank": 0, "fold": 0, "checkpoint": "a0", "config": {}}]', "config_id"),
        ('[{"rank": 0, "config_id": "A", "fold": 0, "checkpoint": "gone", "config": {}}]', "state.pt"),
        ("{}", "non-empty JSON list"),
    ],
    ids=["corrupt", "nan", "missing-key", "missing-checkpoint", "not-a-list"],
)
def test_bad_members_json_exits_2_with_one_line_naming_the_file(tmp_path, capsys, content, problem):
    _fake_checkpoint(tmp_path / "exp" / "a0")
    _experiment(tmp_path, "exp", content)
    data = tmp_path / "data"
    data.mkdir()
    cli = _cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(cli.main, ["--data", str(data), "--storage", str(tmp_path), "--name", "exp"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and str(tmp_path) in err[0]


def test_cli_refuses_missing_data_and_bad_flags(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "exp" / "a0")
    _experiment(tmp_path, "exp", [_entry(0, "A", 0, "a0")])
    cli = _cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(cli.main, ["--data", str(tmp_path / "nope"), "--storage", str(tmp_path)])
    assert exit_info.value.code == 2 and "nope: data folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # an empty storage has no experiment to ensemble
        cli.run_cli(cli.main, ["--storage", str(tmp_path / "exp")])
    assert exit_info.value.code == 2 and "no experiment" in capsys.readouterr().err
    for bad in (["--top-k", "0"], ["--tta", "d8"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.run_cli(cli.main, bad)
        assert exit_info.value.code == 2


def test_members_name_their_data_folder_only_when_they_agree(tmp_path):
    def member(data_dir: str) -> ms.Member:
        return ms.Member("A", 0, tmp_path, config={"data_dir": data_dir})

    assert ms.trained_data_dir([member("/d/real"), member("/d/real")]) == Path("/d/real")
    assert ms.trained_data_dir([member("/d/real"), member("/d/other")]) is None
    assert ms.trained_data_dir([member("")]) is None


def test_oof_items_use_each_configs_folds_and_skip_uncovered_tiles(tmp_path):
    from geopose_ray.data.folds import make_folds
    from geopose_ray.ensemble.job import oof_items

    train = [
        CachedSample(
            f"id{i:02d}", city, 0.5, "train", tmp_path / f"{i}.tif", tmp_path / f"{i}a.tif", 1.0, 0.0
        )
        for i, city in enumerate(["ARG", "ATL", "JAX", "OMA"] * 3)
    ]
    cfg = {"n_folds": 3, "fold_seed": 1, "seed": 7, "fold_mode": "city"}
    a = {f: ms.Member("A", f, tmp_path, config={**cfg, "fold": f}) for f in (0, 1, 2)}
    b = {f: ms.Member("B", f, tmp_path, rank=1, config={**cfg, "fold": f}) for f in (0, 1)}
    items = oof_items([("A", a), ("B", b)], train)
    folds = make_folds(train, 3, 1, "city")  # fold_seed, not the training seed
    assert {it["id"] for it in items} == {s.id for s in train if folds[s.id] in (0, 1)}
    assert all(json.loads(it["folds"]) == [folds[it["id"]]] * 2 for it in items)


def test_a_member_on_the_search_fold_predicts_the_test_tiles_only(tmp_path):
    """The search's own trial is a free member, but its fold's tiles chose its config: they are
    no out-of-fold tile, and the blend table marks the member as test-only."""
    from geopose_ray.data.folds import make_folds
    from geopose_ray.ensemble.job import oof_items
    from geopose_ray.ensemble.report import blend_table, config_rows

    train = [
        CachedSample(f"id{i:02d}", city, 0.5, "train", tmp_path / f"{i}.tif", tmp_path / f"{i}a.tif", 1.0, 0.0)
        for i, city in enumerate(["ARG", "ATL", "JAX", "OMA"] * 3)
    ]
    cfg = {"n_folds": 3, "fold_seed": 0, "fold_mode": "city"}
    a = {f: ms.Member("A", f, tmp_path, selection_fold=0, config={**cfg, "fold": f}) for f in (0, 1)}
    folds = make_folds(train, 3, 0, "city")
    assert {it["id"] for it in oof_items([("A", a)], train)} == {s.id for s in train if folds[s.id] == 1}
    assert ms.oof_folds(a) == [1] and ms.oof_folds({1: a[1]}) == [1]
    rows = config_rows([("A", a)], {"members": [0.5]})
    assert rows[0]["folds"] == [0, 1] and rows[0]["oof_folds"] == [1]
    table = blend_table({"configs": rows, "oof": {"tiles": 4, "plain_mean": 0.5, "blend": 0.5}})
    assert any(line.split()[:2] == ["A", "1"] and "+0" in line for line in table)
    assert any("test tiles only" in line for line in table)


def test_finish_refuses_an_incomplete_submission(synthetic_dir, tmp_path):
    import numpy as np

    from geopose_ray.data.cache import CachedSample
    from geopose_ray.data.layout import load_split
    from geopose_ray.ensemble.job import finish
    from geopose_ray.submission import write_prediction

    test = load_split(synthetic_dir, "test")
    pred_dir = tmp_path / "pred"
    for s in test[1:]:  # the first tile is missing
        write_prediction(pred_dir, s.stem, np.ones((64, 64), np.float32), 1.0, 0.5)
    cached = [CachedSample(s.id, s.city, s.gsd, "test", s.rgb, None, math.nan, math.nan) for s in test]
    out = finish(pred_dir, tmp_path / "out", synthetic_dir, cached, n_previews=2)
    assert out["valid"] is False and out["previews"] == [] and out["test_score"] is None
    assert any(test[0].stem in p for p in out["problems"])


def _truth_tiles(truth: Path, rng) -> list[tuple[str, str]]:
    """One 8 px truth tile per city in the official format (some no-data pixels); (stem, city)."""
    import numpy as np

    from geopose_ray.data import io
    from geopose_ray.submission import prediction_paths

    tiles = []
    for city in ("ARG", "ATL", "JAX", "OMA"):
        stem = f"{city}_t{city.lower()}"
        agl = rng.uniform(0.0, 30.0, (8, 8)).astype(np.float32)
        agl[0, :3] = np.nan
        agl_path, vflow_path = prediction_paths(truth, stem)
        truth.mkdir(exist_ok=True)
        io.write_agl_cm(agl_path, agl)
        io.write_vflow(vflow_path, io.VFlow(scale=rng.uniform(1.0, 3.0), angle=rng.uniform(-3.0, 3.0)))
        tiles.append((stem, city))
    return tiles


def test_member_and_blend_test_scores_equal_the_official_scorer_on_written_files(tmp_path):
    """Each member config alone, the plain mean and the blend, scored from the actors' sums,
    equal `score_dirs` on the files that prediction would write (cm-rounded, clipped)."""
    import numpy as np

    from geopose_ray.ensemble.blend import BlendParams
    from geopose_ray.ensemble.job import truth_sums
    from geopose_ray.ensemble.report import blend_table, test_table
    from geopose_ray.predict import Prediction
    from geopose_ray.score import score_dirs
    from geopose_ray.submission import write_prediction

    rng = np.random.default_rng(0)
    truth = tmp_path / "truth"
    params = BlendParams([0.75, 0.25], agl_mult={"JAX": 1.1})
    variants = {"a": BlendParams([1.0, 0.0]), "b": BlendParams([0.0, 1.0]), "mean": BlendParams([0.5, 0.5])}
    results = {}
    for stem, city in _truth_tiles(truth, rng):
        per_config = [  # raw member AGL reaches below 0: what is written is clipped
            Prediction(
                rng.uniform(-2.0, 35.0, (8, 8)).astype(np.float32), rng.uniform(1, 3), rng.normal(size=2)
            )
            for _ in range(2)
        ]
        blend = params.apply(per_config, 0.5, city)
        for name, p in [
            *((n, v.apply(per_config, 0.5, city)) for n, v in variants.items()),
            ("blend", blend),
        ]:
            write_prediction(tmp_path / name, stem, p.agl, p.scale, p.angle)
        results[stem] = {"city": city, "sums": truth_sums(truth, stem, per_config, blend, 0.5, city)}
    results["no-truth"] = {
        "city": "ARG",
        "sums": truth_sums(truth, "ARG_missing", per_config, blend, 0.5, "ARG"),
    }
    assert results["no-truth"]["sums"] is None
    official = {n: score_dirs(truth, tmp_path / n) for n in (*variants, "blend")}
    table = test_table(results, official["blend"])
    assert table["tiles"] == 4
    assert table["members"] == pytest.approx([official["a"]["final"], official["b"]["final"]], rel=1e-9)
    assert table["plain_mean"] == pytest.approx(official["mean"]["final"], rel=1e-9)
    assert table["blend_from_actors"] == pytest.approx(table["blend"], rel=1e-9)
    assert table["gain"] == pytest.approx(table["blend"] - max(table["members"]))
    assert test_table({"x": {"city": "ARG", "sums": None}}, None) is None
    report = {
        "oof": {
            "tiles": 12,
            "validation": "in-sample (one fold)",
            "plain_mean": 0.1,
            "blend": 0.2,
            "kept": [],
        },
        "configs": [
            {"config_id": c, "folds": [0, 1], "oof": o, "test": t}
            for c, o, t in zip("ab", (0.1, None), table["members"])
        ],
        "test": table,
    }
    lines = blend_table(report)
    assert [ln.split()[0] for ln in lines[2:6]] == ["a", "b", "plain", "blend"]
    assert lines[3].split()[2] == "-" and "kept: none" in lines[5]  # a missing OOF score
    assert lines[-1].startswith(
        f"best member test {max(table['members']):.4f}  blend test {table['blend']:.4f}"
    )
    assert lines[-1].endswith(f"(gain {table['gain']:+.4f})")
    assert not blend_table({**report, "test": None})[-1].startswith("best member")
    assert lines[5].split()[1] == "0.2000"  # no cross-fitted score: the blend's own
    judged = blend_table({**report, "oof": {**report["oof"], "judged": 0.15}})[5]
    assert judged.split()[1] == "0.1500" and "(in-sample OOF 0.2000)" in judged  # the honest one first
    pairs = [{"members": [0, 1], "agl_corr": 0.968, "vflow_corr": 0.96, "agl_cut": 0.003, "vflow_cut": 0.005}]
    with_div = blend_table({**report, "oof": {**report["oof"], "diversity": pairs}})
    assert with_div[:-1] == lines and with_div[-1].startswith("members' OOF error correlation: AGL 0.968")


def _checkpoints(exp: Path) -> list[dict]:
    """Untrained members in the real checkpoint format: config A on folds 0-2, B on folds 0-1."""
    import torch

    from geopose_ray.checkpoint import save_state
    from geopose_ray.config import Config
    from geopose_ray.models import build_model

    entries = []
    for rank, (cid, extra, folds) in enumerate([("A", {}, (0, 1, 2)), ("B", {"use_gsd": False}, (0, 1))]):
        for fold in folds:
            torch.manual_seed(10 * rank + fold)
            cfg = Config.from_dict({"encoder": "resnet18", "n_folds": 3, "fold": fold, **extra})
            folder = exp / f"{cid}{fold}"
            save_state(folder, {"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()})
            entries.append({**_entry(rank, cid, fold, str(folder)), "config": cfg.to_dict()})
    return entries


@pytest.mark.slow
@pytest.mark.ray
def test_end_to_end_cli_writes_a_valid_scored_submission(ray_session, synthetic_dir, tmp_path, capsys):
    from geopose_ray.score import score_dirs
    from geopose_ray.submission import check_submission

    exp = tmp_path / "storage" / "exp"
    _experiment(tmp_path / "storage", "exp", _checkpoints(exp))
    cli = _cli()
    code = cli.main(["--data", str(synthetic_dir), "--storage", str(tmp_path / "storage"), "--tta", "d4"])
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads((exp / "ensemble" / "ensemble_report.json").read_text())
    archive = Path(report["archive"])
    assert f"submission: {archive}" in out and "plain mean" in out
    assert archive.is_file() and check_submission(archive, synthetic_dir) == []
    score = score_dirs(synthetic_dir / "truth", archive)
    assert math.isfinite(score["final"]) and not score["failures"]
    assert report["test_score"]["final"] == pytest.approx(score["final"])
    test = report["test"]  # every member config alone on the test truth, from the same test pass
    assert test["tiles"] == report["test_tiles"] and len(test["members"]) == 2
    assert test["blend"] == pytest.approx(score["final"])
    assert test["blend_from_actors"] == pytest.approx(score["final"], rel=1e-6)
    assert [c["test"] for c in report["configs"]] == test["members"]
    assert f"best member test {test['best_member']:.4f}  blend test {score['final']:.4f}" in out
    assert [c["config_id"] for c in report["configs"]] == ["A", "B"]
    oof = report["oof"]
    assert oof["folds"] == 2 and oof["tiles"] > 0  # tiles of folds 0 and 1, which both configs cover
    assert all(math.isfinite(c["oof"]) for c in report["configs"])
    assert oof["kept"] or oof["blend"] == pytest.approx(oof["plain_mean"])
    assert len(report["previews"]) == 4 and all(Path(p).stat().st_size > 0 for p in report["previews"])
