"""The ensembling job: out-of-fold inference on the train tiles -> blend fit -> test inference ->
validated submission, previews, report.

Both inference passes are Ray Data `map_batches` over tile records with an actor class
(docs/LIBRARIES.md, 'Ray Data: an actor pool'): each actor loads every member once (one actor per GPU, `num_gpus=1`, or CPU
actors when there is no GPU) and calls the Ray-free `predict_tile`. OOF actors return per-tile
statistics (a few hundred numbers, see `written.tile_stats`) and test actors write their tiles'
prediction files themselves, so no AGL map ever travels through the object store. With a truth/
folder, test actors also return each tile's official metric sums for every member config alone,
the plain mean and the blend, so the best member's test score comes without a second test pass.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from geopose_ray import paths, ray_env, storage
from geopose_ray.config import Config
from geopose_ray.constants import SUBMISSION_ARCHIVE
from geopose_ray.data import io
from geopose_ray.data.cache import CachedSample, load_cache
from geopose_ray.data.folds import config_folds
from geopose_ray.ensemble.blend import BlendParams, OofTable, fit_blend
from geopose_ray.ensemble.diversity import error_diversity
from geopose_ray.ensemble.members import Member, cache_dir_for, group_by_config, lead_config, oof_folds
from geopose_ray.ensemble.plan import actor_pool
from geopose_ray.ensemble.preview import write_previews
from geopose_ray.ensemble.report import add_test_scores, config_rows, write_report
from geopose_ray.ensemble.written import tile_stats
from geopose_ray.errors import InputError
from geopose_ray.metrics import image_sums
from geopose_ray.predict import Prediction, blend_predictions, load_member, predict_tile


class EnsemblePredictor:
    """Ray Data actor. `configs[k]` = {fold: checkpoint dir} of member config k.

    mode "oof": a row names, per config, the fold whose member did not train on the tile; returns
    the tile's blend statistics. mode "test": every fold member of a config predicts, their mean
    is the config's prediction, `params` blends the configs, and the tile's files are written;
    with `truth_dir`, the tile's `truth_sums` come back too. A checkpoint given as a URI is
    downloaded once per node into `checkpoint_cache` (`storage.local_copy`).
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
        truth_dir: str | None = None,
        checkpoint_cache: str | None = None,
    ):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        self.mode, self.tta, self.max_tile, self.params, self.pred_dir = mode, tta, max_tile, params, pred_dir
        self.truth_dir = Path(truth_dir) if truth_dir else None
        root = Path(checkpoint_cache or paths.storage_cache())
        self.models = [
            {int(f): load_member(storage.local_copy(p, root), self.device)[0] for f, p in c.items()}
            for c in configs
        ]

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
            "place": str(row.get("place") or row["id"]),
        }

    def _test(self, row: dict[str, Any]) -> dict[str, Any]:
        from geopose_ray.submission import write_prediction

        per_config = [blend_predictions(self._predict(list(m.values()), row)) for m in self.models]
        gsd, city, stem = float(row["gsd"]), str(row["city"]), f"{row['city']}_{row['id']}"
        pred = self.params.apply(per_config, gsd, city)
        write_prediction(self.pred_dir, stem, pred.agl, pred.scale, pred.angle)
        out = {"id": str(row["id"]), "city": city, "scale": pred.scale, "angle": pred.angle}
        out["place"] = str(row.get("place") or row["id"])
        if self.truth_dir is not None:
            out["sums"] = truth_sums(self.truth_dir, stem, per_config, pred, gsd, city)
        return out


def truth_sums(
    truth_dir: Path, stem: str, per_config: list[Prediction], blend: Prediction, gsd: float, city: str
) -> dict[str, Any] | None:
    """The tile's official metric sums (`metrics.image_sums`) of what each member config alone,
    the plain mean and the blend would write, against truth/; None when the tile has no truth.
    Each AGL is rounded to whole cm as its file would be, so the sums equal what
    `score.score_dirs` reads back from written files."""
    from geopose_ray.submission import prediction_paths

    agl_path, vflow_path = prediction_paths(truth_dir, stem)
    if not (agl_path.is_file() and vflow_path.is_file()):
        return None
    truth_agl, truth = io.read_agl(agl_path), io.read_vflow(vflow_path)  # (H, W) m NaN; px/m, rad
    k = len(per_config)
    alone = [BlendParams(np.eye(k)[i].tolist()).apply(per_config, gsd, city) for i in range(k)]
    mean = BlendParams([1.0 / k] * k).apply(per_config, gsd, city)

    def sums(p: Prediction) -> list[float]:
        written = io.agl_cm_to_m(io.agl_m_to_cm(p.agl))  # as the file holds it
        return image_sums(truth_agl, written, truth.scale, truth.angle, p.scale, p.angle).tolist()

    return {"members": [sums(p) for p in alone], "plain_mean": sums(mean), "blend": sums(blend)}


def _pool(num_actors: int | None, n_items: int) -> tuple[int, dict[str, float], int]:
    """(actors, per-actor resources, torch threads) on the live cluster (`plan.actor_pool`: the
    rule the dry run's plan shows)."""
    return actor_pool(ray.cluster_resources(), num_actors, n_items)


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
    (each config's own folds, `config_folds`, as its members were trained). A member on the
    search's own fold predicts the test tiles only: that fold's tiles chose its config."""
    fold_maps, honest = [], []
    for _, members in configs:
        cfg = next(iter(members.values())).cfg()
        fold_maps.append(config_folds(train, cfg.data))
        honest.append(oof_folds(members))
    items = []
    for s in train:
        folds = [fm[s.id] for fm in fold_maps]
        if all(f in ok for f, ok in zip(folds, honest)):
            items.append({**_record(s), "agl": str(s.agl), "folds": json.dumps(folds)})
    return items


def _record(s: CachedSample) -> dict[str, Any]:
    return {
        "id": s.id, "city": s.city, "gsd": s.gsd, "rgb": str(s.rgb), "scale": s.scale, "angle": s.angle,
        "place": s.place or (f"{s.city}/{s.group}" if s.group else s.id),  # a test tile: its group, if given
    }  # fmt: skip


def _blend(records: list[dict], n_configs: int) -> tuple[BlendParams, dict[str, Any]]:
    if not records:
        return BlendParams([1.0 / n_configs] * n_configs), {"tiles": 0, "kept": [], "note": "no OOF tiles"}
    table = OofTable.from_records(records)
    params, fit = fit_blend(table)
    fit["diversity"] = error_diversity(table)
    return params, fit


def _ensure_cache(data_dir: Path, cfg: Config) -> Path:
    """The conversion cache of `data_dir`; the members' own cache folder only when they were
    trained on this same data folder."""
    from geopose_ray.convert import ensure_cache

    return ensure_cache(data_dir, cache_dir_for(data_dir, cfg), map_fn=ray_env.task_map)


def run_ensemble(
    members: list[Member],
    data_dir: str | Path,
    out_dir: str | Path,
    tta: str = "flip",
    max_tile: int | None = None,
    num_actors: int | None = None,
    n_previews: int = 4,
    archive: str | Path | None = None,
    checkpoint_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Fit the blend out-of-fold, predict the test tiles, pack and check the submission (into
    `archive`, default `out_dir/submission_compressed.tar.gz`). Members whose checkpoints are
    URIs are downloaded by the actors into `checkpoint_cache` (default `paths.storage_cache()`).

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
        "checkpoint_cache": str(Path(checkpoint_cache or paths.storage_cache()).resolve()),  # absolute: the actors' cwd differs
    }
    t0 = time.perf_counter()
    records = run_actors(oof_items(configs, load_cache(cache, "train")), num_actors, mode="oof", **common)
    timings = {"oof_s": time.perf_counter() - t0}
    params, fit = _blend(list(records.values()), len(configs))
    pred_dir = out_dir / "predictions"
    shutil.rmtree(pred_dir, ignore_errors=True)  # a stale tile from an earlier run must not be packed
    pred_dir.mkdir(parents=True)
    truth = data_dir / "truth"
    t0 = time.perf_counter()
    written = run_actors(
        [_record(s) for s in test],
        num_actors,
        mode="test",
        params=params,
        pred_dir=str(pred_dir),
        truth_dir=str(truth) if truth.is_dir() else None,
        **common,
    )
    timings["test_s"] = time.perf_counter() - t0
    report = {"configs": config_rows(configs, fit), "tta": tta, "oof": fit, "test_tiles": len(written)}
    archive = Path(archive) if archive else out_dir / SUBMISSION_ARCHIVE
    report.update(finish(pred_dir, archive, data_dir, test, n_previews), timings=timings)
    return write_report(out_dir, add_test_scores(report, written))


def finish(
    pred_dir: Path, archive: Path, data_dir: Path, test: list[CachedSample], n_previews: int
) -> dict[str, Any]:
    """Pack, check (before anyone sees the path), preview and, with a truth/ folder, score."""
    from geopose_ray.score import score_dirs
    from geopose_ray.submission import check_submission, pack

    archive = pack(pred_dir, archive)
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
    previews = write_previews(pred_dir.parent / "previews", tiles, pred_dir, truth, n_previews)
    return {
        "archive": str(archive),
        "valid": True,
        "problems": [],
        "previews": [str(p) for p in previews],
        "test_score": score_dirs(truth, archive) if truth else None,
    }
