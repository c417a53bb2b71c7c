"""The benchmarks' pieces on tiny inputs (the benches themselves take minutes: bench/run_all.py).

Each bench module is imported and one of its measuring functions run on 64 px data, checking
that it measures what it claims (the same crops, the same predictions, the same training).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `bench` lives at the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (
    asha,
    asha_replay,
    common,
    concurrency,
    inference,
    loader,
    poolings,
    precision,
    ray_overhead,
    run_all,
)
from bench import search_value as sv
from bench import search_value_table as svt
from geopose_ray.config import Config
from geopose_ray.errors import EXIT_BAD_INPUT, InputError, run_cli
from geopose_ray.tune.space import load_space


def test_emit_prints_one_json_line_and_rounds(capsys):
    record = common.emit("demo", 2.0 / 3.0, seconds=1234.5678, ok=True, name="x")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == record
    assert record.pop("load_1m") >= 0
    assert record == {"bench": "demo", "ratio": 0.6667, "seconds": 1235.0, "ok": True, "name": "x"}
    assert common.goal_met(60.0, ">=", 50.0) and not common.goal_met(1.2, "<=", 1.05)
    assert common.goal_met(math.nan, ">=", 1.0) is None


def test_machine_record_names_cpu_cores_ram_and_date():
    m = common.machine()
    assert m["cores"] >= 1 and m["ram_gib"] > 0 and m["cpu"]
    assert m["date"].endswith("UTC") and m["load_1m"] >= 0


def test_loader_reads_the_same_crops_from_cache_and_originals(synthetic_dir, tmp_path):
    cached, original = loader.paired_samples(synthetic_dir, tmp_path / "cache", max_tiles=2)
    assert [s.id for s in cached] == [s.id for s in original]
    assert all(s.rgb.suffix == ".tif" for s in cached) and all(s.rgb.suffix == ".j2k" for s in original)
    res = loader.crop_rates(cached, original, crop=32, n_cache=4, n_j2k=2)
    assert res["identical"] is True
    assert all(res[k] > 0 for k in ("cache_crops_per_s", "j2k_crops_per_s", "ratio", "item_ratio"))
    # and the check does notice different crops
    a = loader.TimedReads(cached, crop=32, seed=0)
    b = loader.TimedReads(cached, crop=32, seed=1)
    assert not loader.same_items([a[0], a[1]], [b[0], b[1]])


def test_bench_cli_bad_data_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(loader.main, ["--data", str(missing), "--work", str(tmp_path)])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


def test_ray_overhead_bare_loop_stops_at_the_target_and_checkpoints(synthetic_dir, synthetic_cache, tmp_path):
    space = load_space(ray_overhead.overhead_space(tmp_path))
    assert space.num_samples == 1 and space.scheduler.grace_period == space.scheduler.max_epochs
    flat = {**space.defaults(), "data_dir": str(synthetic_dir), "cache_dir": str(synthetic_cache)}
    flat.update(max_train_samples=2, max_val_samples=1)  # seconds, not tens of seconds
    t0 = time.perf_counter()
    seconds, epochs, score = ray_overhead.bare_loop(Config.from_dict(flat), 0.0, tmp_path / "ckpt")
    assert epochs == 1 and 0 < seconds <= time.perf_counter() - t0
    assert math.isfinite(score) and (tmp_path / "ckpt" / "state.pt").is_file()


def test_no_stop_space_keeps_the_smoke_search_but_has_one_rung(tmp_path):
    smoke = load_space(common.SMOKE_SPACE)
    budget = smoke.scheduler.max_epochs
    path = common.derived_space(tmp_path / "no_stop.yaml", scheduler={"grace_period": budget})
    derived = load_space(path)
    assert derived.scheduler.grace_period == derived.scheduler.max_epochs == smoke.scheduler.max_epochs
    assert derived.parameters == smoke.parameters and derived.fixed == smoke.fixed
    with pytest.raises(InputError):  # validated: grace beyond the budget is refused
        common.derived_space(tmp_path / "bad.yaml", scheduler={"grace_period": budget + 1})


def _board(scores, epochs, ids):
    return pd.DataFrame({"score": scores, "epochs_run": epochs, "config_id": ids,
                         "stopped_early": [e < 3 for e in epochs]})  # fmt: skip


def test_asha_comparison_and_goal():
    assert asha.asha_floor(4, 3, 1) == pytest.approx(0.5)
    assert asha.asha_floor(16, 9, 1) == pytest.approx(24 / 144)
    full = _board([0.5, 0.4, 0.3, 0.2], [3, 3, 3, 3], ["a", "b", "c", "d"])
    cheap = _board([0.5, 0.1, 0.1, 0.0], [3, 1, 1, 1], ["a", "b", "c", "d"])
    cmp = asha.compare(cheap, full)
    assert cmp["epochs_asha"] == 6 and cmp["epochs_full"] == 12 and cmp["same_best_trial"]
    assert cmp["same_configs"] and cmp["stopped_early"] == 3
    assert asha.verdict(cmp) is False  # 50 % of the epochs misses the 35 % goal
    assert asha.verdict({**cmp, "epochs_asha": 4}) is True
    other_best = asha.compare(_board([0.45, 0.1], [1, 1], ["b", "a"]), _board([0.5, 0.4], [3, 3], ["a", "b"]))
    assert not other_best["same_best_trial"] and other_best["best_delta"] == pytest.approx(-0.05)
    assert asha.verdict(other_best) is False  # cheap, but the best got lost


def test_poolings_default_is_the_models_and_the_others_follow_the_tall_pixels():
    """The default pooling is what the model computes (heads.pooled_direction); on a field whose
    ground points one way and whose few tall pixels point the other, weighting by MAG² or keeping
    the tallest 5 % turns the direction towards the tall pixels."""
    import torch

    from geopose_ray.models.heads import pooled_direction

    flow = torch.zeros(2, 20, 20)
    flow[0] = 1.0  # ground: (sin, cos) = (1, 0), MAG 1
    flow[:, :2, :] = torch.tensor([0.0, 5.0])[:, None, None]  # 40 tall pixels: (0, 1)
    mag = torch.ones(1, 20, 20)
    mag[:, :2, :] = 9.0  # 40 x 9 = 360 votes, as many as the ground's
    dirs = poolings.poolings(flow, mag)
    expected = pooled_direction(flow[None], mag[None])[0].double()
    assert torch.allclose(dirs["mag_unit"] / mag.sum(), expected, atol=1e-4)

    def angle(v):
        return math.degrees(math.atan2(float(v[0]), float(v[1])))

    assert abs(angle(dirs["mag_unit"]) - 45) < 1  # as many votes each way: halfway
    assert angle(dirs["mag2_unit"]) < 20 and abs(angle(dirs["top5_unit"])) < 1e-6  # the tall pixels win


def test_inference_batched_and_per_view_predict_the_same():
    model = inference.build("resnet18", "cpu")
    res = inference.tta_times(model, inference.make_tiles(1, 64), repeats=1, device="cpu")
    assert res["max_abs_diff_m"] < 1e-4
    assert res["batched_s_per_tile"] > 0 and res["per_view_s_per_tile"] > 0 and res["ratio"] > 0


def test_precision_rates_train_from_the_same_weights():
    batches = precision.make_batches(1, 2, 64)
    b = batches[0]
    valid = ~b["agl"].isnan()
    assert (b["mag"][valid] == (b["agl"] * b["scale"].view(-1, 1, 1, 1))[valid]).all()
    rates = precision.train_rates(precision.CPU_VARIANTS, batches, "cpu", "resnet18", rounds=1)
    assert set(rates) == set(precision.CPU_VARIANTS)
    for r in rates.values():
        assert r["imgs_per_s"] > 0 and math.isfinite(r["train_loss"])
    # same weights and batch: bf16 autocast changes the first loss only a little
    assert rates[("bf16", False)]["train_loss"] == pytest.approx(
        rates[("fp32", False)]["train_loss"], rel=0.05
    )


def test_concurrency_usage_share_and_limit():
    with concurrency.Usage(interval=0.05) as usage:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass
    assert 0.0 < usage.busy_frac <= 1.0 and usage.peak_mem_gib > 0
    hist = pd.DataFrame({"epoch_time_s": [2.0, 2.0], "time_total_s": [5.0, 8.0]})
    assert concurrency.train_share([SimpleNamespace(history=hist)] * 2) == pytest.approx(0.5)
    busy = {"trials_per_h": 100.0, "cpu_busy": 0.97, "train_share": 0.8}
    assert concurrency.limit(busy, {**busy, "trials_per_h": 102.0}).startswith("CPU")
    idle = {"trials_per_h": 100.0, "cpu_busy": 0.6, "train_share": 0.3}
    assert "fixed costs" in concurrency.limit(idle, {**idle, "trials_per_h": 150.0})


def test_run_all_rewrites_only_between_the_markers(tmp_path):
    start, end = run_all.ROWS_MARKERS
    m_start, m_end = run_all.MACHINE_MARKERS
    doc = tmp_path / "B.md"
    doc.write_text(f"# head\n{m_start}\nold machine\n{m_end}\ntext\n{start}\n| old |\n{end}\n## tail\n")
    results = run_all.parse_results(
        'Tune noise\n{"bench": "loader", "ratio": 120.0, "goal": ">= 50x", "goal_met": true, "identical": true}\n'
        '{"not": "a result"}\n{"bench": "asha", "ratio": 0.5, "goal_met": false, "epochs_asha": 6}\n'
    )
    assert [r["bench"] for r in results] == ["loader", "asha"]
    failed = {"bench": "concurrency", "ratio": math.nan, "error": "exit code 1, log x"}
    rows = run_all.render_rows([*results, failed], {"loader": 12.0, "asha": 80.0})
    lines = rows.splitlines()
    assert len(lines) == 3
    assert "| 1 | loader | 120 |" in lines[0] and "**met**" in lines[0] and "identical yes" in lines[0]
    assert "**missed**" in lines[1] and "epochs_asha 6" in lines[1]
    assert "failed" in lines[2] and "exit code 1" in lines[2]
    run_all.rewrite_doc(doc, "new machine", rows)
    text = doc.read_text()
    assert text.startswith("# head\n") and text.endswith("## tail\n") and "\ntext\n" in text
    assert "old" not in text and "new machine" in text and rows in text
    run_all.rewrite_doc(doc, "new machine", rows)
    assert doc.read_text() == text  # idempotent
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(InputError):
        run_all.rewrite_doc(tmp_path / "plain.md", "m", rows)


def _curves(scores: list[list[float]], concurrent: int = 1, seconds: float = 1.0) -> dict:
    trials = [
        {
            "trial_id": str(i),
            "config": {},
            "epochs": [{"epoch": e + 1, "score": s, "seconds": seconds} for e, s in enumerate(c)],
        }
        for i, c in enumerate(scores)
    ]
    return {"concurrent": concurrent, "max_epochs": max(map(len, scores)), "trials": trials}


def test_asha_replay_runs_rays_scheduler_over_recorded_curves():
    good, bad = [0.1, 0.2, 0.3, 0.4], [-0.5, -0.4, -0.3, -0.2]
    curves = _curves([good, bad, bad, [0.2, 0.3, 0.5, 0.6]])
    no_stop = asha_replay.replay(curves, [0, 1, 2, 3], grace=4, rf=2)
    assert no_stop["epochs"] == 16 and no_stop["best"] == 3  # one rung at the full budget: nothing stops
    halving = asha_replay.replay(curves, [0, 1, 2, 3], grace=1, rf=2)
    assert halving["epochs"] == 4 + 1 + 1 + 4  # the first and the best run on; the bad ones stop at epoch 1
    assert halving["best"] == 3 and halving["best_score"] == pytest.approx(0.6)
    rows = asha_replay.study(curves, [(1, 2), (4, 2)], orders=5)
    assert [r["ratio_recorded"] for r in rows] == [pytest.approx(10 / 16), 1.0]
    assert all(r["keeps_best"] == 1.0 for r in rows) and rows[0]["ratio_max"] <= 1.0


def test_asha_replay_reproduces_the_measured_run():
    """The recorded no-stop run of docs/BENCHMARKS.md, replayed with smoke.yaml's ASHA, spends what
    the ASHA run of the same morning spent: 105 of 200 epochs, keeping the best trial."""
    curves = asha_replay.load_curves(asha_replay.DEFAULT_CURVES)
    sched = load_space(common.SMOKE_SPACE).scheduler
    out = asha_replay.replay(
        curves, list(range(len(curves["trials"]))), sched.grace_period, sched.reduction_factor
    )
    assert out["epochs"] == 105 and out["best_score"] == pytest.approx(0.7316, abs=1e-4)


def test_asha_curves_from_records_orders_trials_and_counts_concurrency():
    def record(tid: str, start: float, scores: list[float]) -> SimpleNamespace:
        n = len(scores)
        history = pd.DataFrame(
            {
                "epoch": range(1, n + 1),
                "score": scores,
                "time_this_iter_s": [10.0] * n,
                "timestamp": [start + 10 * (e + 1) for e in range(n)],
            }
        )
        return SimpleNamespace(trial_id=tid, history=history, train_config={"lr": 1e-3})

    recs = [
        record("late", 100.0, [0.1]),
        record("first", 0.0, [0.1, 0.2, 0.3]),
        record("second", 5.0, [0.2, 0.1]),
    ]
    curves = asha_replay.curves_from_records(recs, "test")
    assert [t["trial_id"] for t in curves["trials"]] == ["first", "second", "late"]
    assert curves["concurrent"] == 2 and curves["trials"][0]["epochs"][2] == {
        "epoch": 3,
        "score": 0.3,
        "seconds": 10.0,
    }


def test_asha_replay_bad_curves_file_exits_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "curves.json"
    bad.write_text('{"trials": []}')
    with pytest.raises(SystemExit) as exit_info:
        run_cli(asha_replay.main, ["--curves", str(bad)])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


# --- the search-value bench (bench/search_value.py: hours; its pieces here) -----------------------
def test_search_value_arms_parse_and_run_search_before_config():
    assert sv.parse_arm("search") == sv.Arm("search", "search", None, None)
    assert sv.parse_arm("config") == sv.Arm("config", "config")
    assert sv.parse_arm("tpe@24") == sv.Arm("tpe@24", "search", "tpe", 24)
    assert sv.parse_arm("gp") == sv.Arm("gp", "search", "gp", None)
    for bad in ("bayes", "config@3", "tpe@x", "tpe@0", "auto"):
        with pytest.raises(InputError, match="--arms"):
            sv.parse_arm(bad)
    arms = sv.ordered([sv.parse_arm(a) for a in ("tpe", "config", "search", "random@24")])
    assert [a.label for a in arms] == ["search", "config", "tpe", "random@24"]
    ctx = sv.Context(Path("/w"), Path("/w/r.jsonl"), quick=True, cores=2)
    cmd = sv.search_cmd(ctx, Path("/d"), sv.parse_arm("tpe@5"), 1, Path("/s"))
    assert cmd[1:] == ["run_search.py", "--data", "/d", "--storage", "/s", "--name", "search", "--seed", "1",
                       "--sampler", "tpe", "--num-samples", "3", "--max-epochs", "3", "--num-samples", "5"]  # fmt: skip


def test_search_value_gives_the_config_arm_the_search_time_as_epochs(synthetic_dir, tmp_path):
    assert sv.config_epochs(600.0, 10.0, seeds=2, cores=2) == int((600 - 15) / 10)
    assert sv.config_epochs(600.0, 10.0, seeds=3, cores=2) == int((600 - 2 * 15) / 20)  # two waves
    assert sv.config_epochs(10.0, 10.0, seeds=2, cores=2) == 1
    # the default trial as the data derives it (on tall data the lr follows the derived batch)
    default = sv._derived_space(synthetic_dir).default_point()
    for name, cfg, times in (("trial_a", {**default, "lr": 0.01}, [50, 1, 1]), ("trial_b", default, [40, 10, 10, 16])):
        (tmp_path / name).mkdir()
        rows = [{"config": {**cfg, "epochs": 20}, "time_this_iter_s": t, "epoch": i + 1} for i, t in enumerate(times)]
        (tmp_path / name / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # the defaults' trial, its first epoch (start-up) left out, its validated epoch (16 s) at its share
    assert sv.default_epoch_s(tmp_path, synthetic_dir) == 12.0
    assert math.isnan(sv.default_epoch_s(tmp_path / "none", synthetic_dir))


def test_search_value_config_files_train_the_default_trial(synthetic_dir, tmp_path):
    from geopose_ray.train import load_config, parse_args

    files = sv.train_config_files(synthetic_dir, [3, 4], 7, tmp_path)
    cfg = load_config(parse_args(["--config", str(files[1])]))
    assert (cfg.train.epochs, cfg.train.seed, cfg.data.fold, cfg.data.data_dir) == (7, 4, 0, str(synthetic_dir))
    assert cfg.model.encoder == load_space(common.SMOKE_SPACE).default_point()["encoder"]
    from geopose_ray.data import cache, stats

    measured = stats.from_cache(cache.load_cache(synthetic_dir / ".geopose_cache", "train"))
    space = load_space(common.SMOKE_SPACE).with_data(measured)[0]
    derived = space.fixed  # as the search's trials
    assert (cfg.data.crop, cfg.data.epoch_samples) == (derived["crop"], derived["epoch_samples"])
    assert cfg.train.val_every == space.scheduler.grace_period  # validated where the trials are


def _row(arm: str, seed: int, score: float, **more) -> dict:
    return {"bench": "search_value", "set": "heldout-128-many", "arm": arm, "seed": seed, "quick": False,
            "score": score, "wall_s": 100.0, "cpu_s": 200.0, **more}  # fmt: skip


def test_search_value_table_pairs_seeds_and_applies_the_spread_rule():
    rows = [_row("search", s, 0.50 + 0.01 * s, sampler="random", trials=6, best_val=0.6) for s in (0, 1, 2)]
    rows += [_row("config", s, 0.40 + 0.01 * s, epochs=80) for s in (0, 1, 2)]
    rows += [_row("tpe", s, 0.52 + 0.01 * s, sampler="tpe", trials=6, best_val=0.62) for s in (0, 1)]
    rows += [_row("gp", 0, 0.9, quick=True, sampler="gp", trials=3, best_val=0.1), {"bench": "search_value", "error": "x"}]
    lines = svt.render(rows)
    text = "\n".join(lines)
    assert "| heldout-128-many | config | 80 epochs | 3 | 0.410 | 0.020 | 100 | 200 | 1.00 |" in text
    assert "| heldout-128-many | search | random @ 6 | 3 | 0.510 | 0.020 |" in text
    assert "search over the default config: +0.100 (paired, 3 seeds); larger seed spread 0.020; " \
           "beats it by more than the spread: yes" in text
    tpe = next(line for line in lines if line.startswith("| heldout-128-many | 6 | tpe |"))
    assert "| 0.020 |" in tpe and tpe.endswith("| too few seeds (2 of 3) |")  # gain +0.02 over 2 paired seeds
    assert "gp" not in text  # the quick row stays out of the bench's tables
    assert svt.render(rows, quick=True)[0] == svt.QUICK_NOTE
    assert svt.verdict(0.02, 0.03, 3) == "no" and svt.verdict(0.04, 0.03, 3) == "yes"


def test_search_value_dry_run_and_table_write_nothing(tmp_path, capsys):
    work = tmp_path / "w"
    assert sv.main(["--dry-run", "--quick", "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert "set heldout-128-many:" in out and "--num-samples 3 --max-epochs 3" in out
    assert "config seed 0: 2 x python -m geopose_ray.train" in out and not work.exists()
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(_row("search", 0, 0.5, sampler="random", trials=6, best_val=0.6)) + "\n")
    assert sv.main(["--dry-run", "--results", str(results), "--sets", "heldout-512-low", "--seeds", "0",
                    "--work", str(work)]) == 0  # fmt: skip
    assert "search seed 0: run_search.py" in capsys.readouterr().out
    assert sv.main(["--table", "--results", str(results)]) == 0
    assert "| heldout-128-many | search | random @ 6 | 1 | 0.500 |" in capsys.readouterr().out
    with pytest.raises(InputError, match="only the held-out sets"):
        sv.main(["--dry-run", "--sets", "tune-tall-128", "--work", str(work)])
    assert not work.exists()
