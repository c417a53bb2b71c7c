"""The ensembling job: out-of-fold inference on the train tiles -> blend fit -> test inference ->
validated submission, previews, report.

Both inference passes are Ray Data `map_batches` over tile records with an actor class
(RAY_NOTES section 8): each actor loads every member once (one actor per GPU, `num_gpus=1`, or CPU
actors when there is no GPU) and calls the Ray-free `predict_tile`. OOF actors return per-tile
statistics (a few hundred numbers, see `blend.tile_stats`) and test actors write their tiles'
prediction files themselves, so no AGL map ever travels through the object store.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from geopose_ray.atomic import atomic_write_text
from geopose_ray.config import Config
from geopose_ray.constants import SUBMISSION_ARCHIVE
from geopose_ray.data import io
from geopose_ray.data.cache import CachedSample, load_cache
from geopose_ray.data.folds import make_folds
from geopose_ray.ensemble.blend import BlendParams, OofTable, fit_blend, tile_stats
from geopose_ray.ensemble.members import Member, cache_dir_for, group_by_config, lead_config
from geopose_ray.ensemble.preview import write_previews
from geopose_ray.errors import InputError
from geopose_ray.predict import blend_predictions, load_member, predict_tile

REPORT_JSON = "ensemble_report.json"


class EnsemblePredictor:
    """Ray Data actor. `configs[k]` = {fold: checkpoint dir} of member config k.

    mode "oof": a row names, per config, the fold whose member did not train on the tile; returns
    the tile's blend statistics. mode "test": every fold member of a config predicts, their mean
    is the config's prediction, `params` blends the configs, and the tile's files are written.
    """

    def __init__(
        self,
        configs: list[dict[int, str]],
        mode: str,
        tta: str,
        max_tile: int | None = None,
        params: BlendParams | None = None,
        pred_dir: str | None = None,
        threads: int = 0,
    ):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        self.mode, self.tta, self.max_tile, self.params, self.pred_dir = mode, tta, max_tile, params, pred_dir
        self.models = [{int(f): load_member(p, self.device)[0] for f, p in c.items()} for c in configs]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["id"]))]
        run = self._oof if self.mode == "oof" else self._test
        return {"id": batch["id"], "result": np.array([json.dumps(run(r)) for r in rows])}

    def _predict(self, models: list[torch.nn.Module], row: dict[str, Any]):
        image = io.read_rgb(str(row["rgb"]))  # (H, W, 3) uint8
        return predict_tile(
            models, image, float(row["gsd"]), str(row["city"]), self.tta, max_tile=self.max_tile
        )

    def _oof(self, row: dict[str, Any]) -> dict[str, Any]:
        folds = [int(f) for f in json.loads(str(row["folds"]))]
        preds = self._predict([m[f] for m, f in zip(self.models, folds)], row)
        truth = io.read_agl(str(row["agl"]))  # (H, W) m NaN
        stats = tile_stats(preds, truth, float(row["scale"]), float(row["angle"]))
        return {
            **stats,
            "id": str(row["id"]),
            "city": str(row["city"]),
            "fold": folds[0],
            "gsd": float(row["gsd"]),
        }

    def _test(self, row: dict[str, Any]) -> dict[str, Any]:
        from geopose_ray.submission import write_prediction

        per_config = [blend_predictions(self._predict(list(m.values()), row)) for m in self.models]
        pred = self.params.apply(per_config, float(row["gsd"]), str(row["city"]))
        write_prediction(self.pred_dir, f"{row['city']}_{row['id']}", pred.agl, pred.scale, pred.angle)
        return {"id": str(row["id"]), "scale": pred.scale, "angle": pred.angle}


def _pool(num_actors: int | None, n_items: int) -> tuple[int, dict[str, float], int]:
    """(actors, per-actor resources, torch threads): one actor per GPU, else CPU actors of 2 CPUs."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if gpus:
        return max(1, min(num_actors or gpus, n_items)), {"num_gpus": 1, "num_cpus": 1}, 0
    per = min(2, cpus)
    size = max(1, min(num_actors or max(1, cpus // per), n_items))
    return size, {"num_cpus": per}, per


def run_actors(items: list[dict[str, Any]], num_actors: int | None, **actor_kwargs: Any) -> dict[str, dict]:
    """map_batches of EnsemblePredictor over `items`; returns id -> the actor's result."""
    if not items:
        return {}
    size, resources, threads = _pool(num_actors, len(items))
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * size))
    out = ds.map_batches(
        EnsemblePredictor,
        fn_constructor_kwargs={**actor_kwargs, "threads": threads},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size),
        **resources,
    ).take_all()
    return {str(r["id"]): json.loads(str(r["result"])) for r in out}


def oof_items(
    configs: list[tuple[str, dict[int, Member]]], train: list[CachedSample]
) -> list[dict[str, Any]]:
    """Train tiles that every config has an out-of-fold member for, with the fold per config
    (each config's own n_folds / seed / fold_mode, as its members were trained)."""
    fold_maps = []
    for _, members in configs:
        cfg = next(iter(members.values())).cfg()
        fold_maps.append(make_folds(train, cfg.data.n_folds, cfg.data.fold_seed, cfg.data.fold_mode))
    items = []
    for s in train:
        folds = [fm[s.id] for fm in fold_maps]
        if all(f in members for f, (_, members) in zip(folds, configs)):
            items.append({**_record(s), "agl": str(s.agl), "folds": json.dumps(folds)})
    return items


def _record(s: CachedSample) -> dict[str, Any]:
    return {"id": s.id, "city": s.city, "gsd": s.gsd, "rgb": str(s.rgb), "scale": s.scale, "angle": s.angle}


def _blend(records: list[dict], n_configs: int) -> tuple[BlendParams, dict[str, Any]]:
    if not records:
        return BlendParams([1.0 / n_configs] * n_configs), {"tiles": 0, "kept": [], "note": "no OOF tiles"}
    return fit_blend(OofTable.from_records(records))


def _ensure_cache(data_dir: Path, cfg: Config) -> Path:
    """The conversion cache of `data_dir`, with the members' folds; their own cache folder only
    when they were trained on this same data folder."""
    from geopose_ray.convert import ensure_cache

    d = cfg.data
    return ensure_cache(
        data_dir, cache_dir_for(data_dir, cfg), n_folds=d.n_folds, seed=d.fold_seed, fold_mode=d.fold_mode
    )


def run_ensemble(
    members: list[Member],
    data_dir: str | Path,
    out_dir: str | Path,
    tta: str = "flip",
    max_tile: int | None = None,
    num_actors: int | None = None,
    n_previews: int = 4,
) -> dict[str, Any]:
    """Fit the blend out-of-fold, predict the test tiles, pack and check the submission.

    Returns the report (also written to `out_dir/ensemble_report.json`); `report["valid"]` is
    False, with `problems`, when `check_submission` refuses the archive.
    """
    if not members:
        raise ValueError("no ensemble members")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    configs = group_by_config(members)
    cache = _ensure_cache(data_dir, lead_config(members))
    test = load_cache(cache, "test")
    if not test:
        raise InputError(data_dir, "no test tiles to predict")
    common = {
        "configs": [{f: str(m.checkpoint) for f, m in ms.items()} for _, ms in configs],
        "tta": tta,
        "max_tile": max_tile,
    }
    t0 = time.perf_counter()
    records = run_actors(oof_items(configs, load_cache(cache, "train")), num_actors, mode="oof", **common)
    timings = {"oof_s": time.perf_counter() - t0}
    params, fit = _blend(list(records.values()), len(configs))
    pred_dir = out_dir / "predictions"
    shutil.rmtree(pred_dir, ignore_errors=True)  # a stale tile from an earlier run must not be packed
    pred_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    written = run_actors(
        [_record(s) for s in test], num_actors, mode="test", params=params, pred_dir=str(pred_dir), **common
    )
    timings["test_s"] = time.perf_counter() - t0
    report = {"configs": _config_rows(configs, fit), "tta": tta, "oof": fit, "test_tiles": len(written)}
    report.update(finish(pred_dir, out_dir, data_dir, test, n_previews), timings=timings)
    report = json_safe(report)
    atomic_write_text(out_dir / REPORT_JSON, json.dumps(report, indent=2))
    return report


def finish(
    pred_dir: Path, out_dir: Path, data_dir: Path, test: list[CachedSample], n_previews: int
) -> dict[str, Any]:
    """Pack, check (before anyone sees the path), preview and, with a truth/ folder, score."""
    from geopose_ray.score import score_dirs
    from geopose_ray.submission import check_submission, pack

    archive = pack(pred_dir, out_dir / SUBMISSION_ARCHIVE)
    problems = check_submission(archive, data_dir)
    if problems:
        return {
            "archive": str(archive),
            "valid": False,
            "problems": problems,
            "previews": [],
            "test_score": None,
        }
    truth = data_dir / "truth"
    truth = truth if truth.is_dir() else None
    tiles = [(f"{s.city}_{s.id}", s.rgb) for s in sorted(test, key=lambda s: s.id)]
    previews = write_previews(out_dir / "previews", tiles, pred_dir, truth, n_previews)
    return {
        "archive": str(archive),
        "valid": True,
        "problems": [],
        "previews": [str(p) for p in previews],
        "test_score": score_dirs(truth, archive) if truth else None,
    }


def _config_rows(configs: list[tuple[str, dict[int, Member]]], fit: dict[str, Any]) -> list[dict[str, Any]]:
    oof = fit.get("members") or [None] * len(configs)
    rows = []
    for (cid, ms), score in zip(configs, oof):
        first = next(iter(ms.values()))
        rows.append(
            {
                "config_id": cid,
                "rank": first.rank,
                "folds": sorted(ms),
                "search_score": first.score,
                "oof": score,
            }
        )
    return rows


def json_safe(x: Any) -> Any:
    """Plain JSON values: numpy scalars -> Python, Path -> str, NaN/inf -> None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return str(x) if isinstance(x, Path) else x
