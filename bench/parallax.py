"""Why single views are noisy and seeds diverge: train the default config on a family set with
several seeds, then score the test truth view by view.

    python bench/parallax.py --set tune-tall-256 --seeds 0,1,2 [--epochs 20] [--set-key KEY=VALUE] > RUN.jsonl
    python bench/parallax.py --set SET --seeds 1 --views-out V   # also saves V.seed1.pkl
    python bench/parallax.py --combine V.seed0.pkl V.seed1.pkl   # the members' D4 views averaged
    python bench/parallax.py --set SET --rebn V.seed1.pt         # before and after precise_bn
    python bench/parallax.py --set SET --bn-tiles V.seed1.pt     # statistics of 64, 32, 16, 8 tiles
    python bench/parallax.py --plot RUN.jsonl [RUN2.jsonl ...] --out curves.png   # seeds' curves

For each seed: the single-view (identity) score, the 4 rotations alone, the 4 reflections alone,
and D4; the agl and vflow R2 of each; and, per view, the mean direction vector the model
predicts (un-rotated back into the tile's frame) and its mean angle error. A bias that lives in
the image frame (a constant direction, an axis or sign slip) shows as a long mean vector on a
single view and cancels in the rotation average, so identity << rot4 ~ d4 points at it, while
identity ~ rot4 ~ refl4 < d4 says the views are merely noisy. One JSON line per seed; the data
set's own statistics and the derived defaults first. Not part of CI: minutes per seed.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SMOKE_SPACE, sig, work_dir

GROUPS = {
    "none": ("identity",),
    "rot4": ("identity", "rot90_cw", "rot180", "rot90_ccw"),
    "refl4": ("transpose", "hflip", "rot180_t", "vflip"),
    "d4": ("identity", "rot90_cw", "rot180", "rot90_ccw", "transpose", "hflip", "rot180_t", "vflip"),
}


def train_config(data_dir: Path, seed: int, epochs: int | None, keys: dict[str, Any]) -> Any:
    """The default search's default trial on `data_dir` (derived values included), one seed."""
    from geopose_ray.config import Config
    from geopose_ray.convert import ensure_cache, process_map
    from geopose_ray.data import cache, stats
    from geopose_ray.tune.space import SET_BY_RUN, load_space

    cache_dir = ensure_cache(data_dir, map_fn=process_map(), progress=False)
    measured = stats.from_cache(cache.load_cache(cache_dir, "train"))
    base = load_space(SMOKE_SPACE)
    searched = {k: v for k, v in keys.items() if k in base.searched()}  # the default trial's value moved
    run = {k: v for k, v in keys.items() if k in SET_BY_RUN}  # what a search sets, e.g. precise_bn_every
    fixed = {k: v for k, v in keys.items() if k not in searched and k not in run}
    space, lines = base.with_fixed(fixed).with_data(measured)
    flat = {"threads": 2, **space.defaults(), **searched, **run, "data_dir": str(data_dir), "seed": seed}
    if epochs:
        flat["epochs"] = epochs
    return Config.from_dict(flat), measured, lines


def read_test_tiles(
    data_dir: Path, cache_dir: Path, split: str = "test", keep: Any = None
) -> Iterator[tuple[Any, torch.Tensor, dict[str, Any]]]:
    """(cache sample, image (3, H, W) in [0, 1], its truth {city, agl, scale, angle}) for every
    test tile: what the per-view scorers (here and `bench/poolings.py`) run and score. `split`
    "train": the training tiles instead (their own AGL and VFLOW files), those `keep(sample)` takes."""
    from geopose_ray.data import cache, io

    for s in cache.load_cache(cache_dir, split):
        if keep is not None and not keep(s):
            continue
        truth = data_dir / ("truth" if split == "test" else "train") / f"{s.city}_{s.id}"
        vflow = io.read_vflow(truth.with_name(truth.name + "_VFLOW.json"))
        agl = io.read_agl(truth.with_name(truth.name + "_AGL.tif"))
        x = torch.from_numpy(io.read_rgb(s.rgb)).permute(2, 0, 1).float() / 255.0
        yield s, x, {"city": s.city, "agl": agl, "scale": vflow.scale, "angle": vflow.angle}


def per_view(model: torch.nn.Module, data_dir: Path, cache_dir: Path, tiles_of: Any = None) -> dict[str, Any]:
    """Every test tile (or those `tiles_of` yields, as `read_test_tiles` does) through each D4
    view: the un-rotated AGL, scale and raw direction vector."""
    from geopose_ray.predict import _forward_padded
    from geopose_ray.tta import D4_VIEWS, apply_view, invert_direction, invert_view

    tiles, device = [], next(model.parameters()).device
    for s, x, truth in tiles_of if tiles_of is not None else read_test_tiles(data_dir, cache_dir):
        views = {}
        with torch.no_grad():
            for v in D4_VIEWS:
                out = _forward_padded(model, apply_view(x, v)[None].to(device), s.gsd, _city(s.city), "fp32")
                views[v.name] = (
                    invert_view(out["agl"][0], v).cpu().numpy(),
                    float(out["scale"][0]),
                    invert_direction(out["direction"][0], v).cpu().numpy(),
                )
        tiles.append({**truth, "views": views})
    return tiles


def _city(city: str) -> int:
    from geopose_ray.constants import city_index

    return city_index(city)


def score_group(tiles: list[dict], names: tuple[str, ...]) -> dict[str, float]:
    """The official score of the views `names` averaged as predict_tile averages them."""
    from geopose_ray.metrics import GeoposeScore
    from geopose_ray.predict import unit

    score = GeoposeScore()
    for t in tiles:
        agl = np.mean([t["views"][n][0] for n in names], axis=0)
        scale = float(np.mean([t["views"][n][1] for n in names]))
        d = unit(np.sum([t["views"][n][2] for n in names], axis=0))
        score.update(t["city"], t["agl"], agl, t["scale"], t["angle"], scale, math.atan2(d[0], d[1]))
    out = score.compute()
    return {"final": out["final"], "agl_r2": _mean(out["agl_r2"]), "vflow_r2": _mean(out["vflow_r2"])}


def direction_bias(tiles: list[dict], name: str) -> dict[str, float]:
    """One view's mean predicted direction (un-rotated), its length against the mean length of
    single predictions (1 = every tile the same direction: a frame bias), and the mean error."""
    vecs = np.array([t["views"][name][2] for t in tiles])  # (N, 2) raw (sin, cos)
    units = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    err = [
        abs(math.remainder(math.atan2(u[0], u[1]) - t["angle"], 2 * math.pi)) for u, t in zip(units, tiles)
    ]
    return {
        "coherence": float(np.linalg.norm(units.mean(axis=0))),
        "mean_angle": float(math.degrees(math.atan2(*units.mean(axis=0)))),
        "angle_err_deg": float(math.degrees(np.mean(err))),
        "scale_rel_err": float(np.mean([abs(t["views"][name][1] / t["scale"] - 1) for t in tiles])),
    }


def _mean(d: dict[str, float]) -> float:
    vals = [v for v in d.values() if math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def run_seed(
    data_dir: Path, seed: int, epochs: int | None, keys: dict[str, Any], views_out: Path | None = None
) -> dict[str, Any]:
    from geopose_ray.checkpoint import inference_weights, load_weights
    from geopose_ray.models import build_model
    from geopose_ray.train_loop import fit

    cfg, _, _ = train_config(data_dir, seed, epochs, keys)
    curve: list[dict[str, float]] = []
    last: dict[str, Any] = {}
    t0 = time.perf_counter()

    def reporter(metrics: dict[str, float], state_fn: Any) -> None:
        curve.append({k: metrics[k] for k in ("epoch", "score", "train_loss") if k in metrics})
        print(f"[parallax] seed {seed} {json.dumps(sig(curve[-1]))}", file=sys.stderr, flush=True)
        if state_fn is not None:
            last["state"] = state_fn()

    fit(cfg, reporter=reporter)
    wall = time.perf_counter() - t0
    model = build_model(cfg.model)
    load_weights(model, inference_weights(last["state"]))
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # where fit trained it
    tiles = per_view(model.eval(), data_dir, Path(cfg.data.cache_dir or data_dir / ".geopose_cache"))
    if views_out is not None:  # for --combine: members' views averaged as the ensemble averages them
        views_out.parent.mkdir(parents=True, exist_ok=True)
        with open(views_out.with_name(f"{views_out.name}.seed{seed}.pkl"), "wb") as f:
            pickle.dump(tiles, f)
        torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, views_out.with_name(f"{views_out.name}.seed{seed}.pt"))
    return {
        "seed": seed,
        "train_s": wall,
        "val_curve": curve,
        "test": {g: score_group(tiles, names) for g, names in GROUPS.items()},
        "views": {name: direction_bias(tiles, name) for name in GROUPS["d4"]},
    }


def combine(files: list[Path]) -> dict[str, Any]:
    """The score of several members' D4 views averaged together (each member's 8 views, as the
    ensemble's plain mean averages members' D4 predictions), and of each member alone."""
    members = []
    for f in files:
        with open(f, "rb") as fh:
            members.append(pickle.load(fh))
    merged = []
    for per_member in zip(*members):
        views = {f"{m}:{n}": v for m, t in enumerate(per_member) for n, v in t["views"].items()}
        merged.append({**per_member[0], "views": views})
    names = tuple(merged[0]["views"])
    return {
        "members": [str(f) for f in files],
        "each_d4": [score_group(t, GROUPS["d4"])["final"] for t in members],
        "each_none": [score_group(t, GROUPS["none"])["final"] for t in members],
        "mean_d4": score_group(merged, names),
        "mean_none": score_group(merged, tuple(n for n in names if n.endswith(":identity"))),
    }


def _saved(model_file: Path, data_dir: Path) -> tuple[Any, torch.nn.Module, Path]:
    """(config, model on CPU, cache folder) of a model saved by `--views-out`."""
    from geopose_ray.config import Config
    from geopose_ray.models import build_model

    saved = torch.load(model_file, weights_only=False, map_location="cpu")
    cfg = Config.from_dict(saved["config"])
    model = build_model(cfg.model)
    model.load_state_dict(saved["model"])
    return cfg, model, Path(cfg.data.cache_dir or data_dir / ".geopose_cache")


def bn_tiles(model_file: Path, data_dir: Path, counts: tuple[int, ...] = (64, 32, 16, 8)) -> Iterator[dict[str, Any]]:
    """How many whole tiles a re-measure needs: a saved model's statistics re-measured on n
    training tiles (n >= the set's tiles: all; fewer: evenly spread, up to 3 subsets shifted
    along the list), each scored single-view and D4 on the test truth. One record per subset."""
    import copy

    from geopose_ray import precise_bn
    from geopose_ray.data import cache

    cfg, model, cache_dir = _saved(model_file, data_dir)
    train = cache.load_cache(cache_dir, "train")
    for n in (c for c in counts if c <= len(train)):
        step = len(train) // n
        for shift in range(min(3, step)):
            subset = [train[i * step + shift] for i in range(n)]
            m = copy.deepcopy(model)
            batches = precise_bn.bn_batches(subset, cfg.data.val_crop, cfg.data.val_batch_size, n)  # as fit loads them
            t0 = time.perf_counter()
            precise_bn.recompute(m, batches, torch.device("cpu"), "fp32")
            seconds = time.perf_counter() - t0  # the re-measure alone, not the test scoring after it
            tiles = per_view(m.eval(), data_dir, cache_dir)
            scores = {g: score_group(tiles, GROUPS[g])["final"] for g in ("none", "d4")}
            yield {"model": str(model_file), "tiles": n, "shift": shift, "remeasure_s": seconds, **scores}


def rebn(model_file: Path, data_dir: Path) -> dict[str, Any]:
    """A saved model (`--views-out`) scored as trained, then with its BatchNorm statistics
    re-measured as `train_loop.fit` now does (`precise_bn`): no weight changed."""
    from geopose_ray import precise_bn
    from geopose_ray.data import cache

    cfg, model, cache_dir = _saved(model_file, data_dir)
    out = {"model": str(model_file)}
    for when in ("as_trained", "precise_bn"):
        if when == "precise_bn":
            train = cache.load_cache(cache_dir, "train")
            batches = precise_bn.bn_batches(train, cfg.data.val_crop, cfg.data.val_batch_size)
            precise_bn.recompute(model, batches, torch.device("cpu"), "fp32")
        tiles = per_view(model.eval(), data_dir, cache_dir)
        out[when] = {g: score_group(tiles, names)["final"] for g, names in GROUPS.items()}
    return out


def seen_unseen(model_file: Path, data_dir: Path) -> dict[str, Any]:
    """A saved model (`--views-out`) scored view by view on the tiles it trained on (the folds
    but its validation fold), on its validation fold and on the test truth: whether a single
    view's angle error is a fit not reached (high on the seen tiles too) or a fit that does not
    carry to unseen places (low there, high on the others)."""
    from geopose_ray.data import cache, folds

    cfg, model, cache_dir = _saved(model_file, data_dir)
    train = cache.load_cache(cache_dir, "train")
    fold_of = folds.config_folds(train, cfg.data)  # id -> fold
    sets = {
        "seen": read_test_tiles(data_dir, cache_dir, "train", lambda s: fold_of[s.id] != cfg.data.fold),
        "val_fold": read_test_tiles(data_dir, cache_dir, "train", lambda s: fold_of[s.id] == cfg.data.fold),
        "test": read_test_tiles(data_dir, cache_dir),
    }
    out: dict[str, Any] = {"model": str(model_file)}
    for name, tiles_of in sets.items():
        tiles = per_view(model.eval(), data_dir, cache_dir, tiles_of)
        angle = [direction_bias(tiles, v)["angle_err_deg"] for v in GROUPS["d4"]]
        out[name] = {
            "tiles": len(tiles),
            **{g: score_group(tiles, GROUPS[g])["final"] for g in ("none", "d4")},
            "angle_err_deg_per_view": [min(angle), max(angle)],
        }
    return out


def plot(runs: list[Path], out: Path) -> None:
    """One panel per run file: every seed's validation score by epoch, its D4 and single-view
    test scores in the legend, so a reader sees where seeds part and whether they meet again."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 3.6), squeeze=False, sharey=True)
    for ax, path in zip(axes[0], runs):
        head, *seeds = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        for r in seeds:
            test = r["test"]
            ax.plot(
                [c["epoch"] for c in r["val_curve"]], [c["score"] for c in r["val_curve"]],
                label=f"seed {r['seed']}: D4 {test['d4']['final']:.2f}, single {test['none']['final']:.2f}",
            )  # fmt: skip
        keys = ", ".join(f"{k}={v}" for k, v in head["keys"].items() if k != "threads") or "the default"
        ax.set_title(head.get("title") or f"{head['set']}: {keys}", fontsize=9)  # a saved file may name itself
        ax.set_xlabel("epoch")
        ax.set_ylim(-1.0, 0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("validation score (single view, fold 0)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main() -> None:
    import argparse

    from geopose_ray.synthetic.family import generate_named

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plot", nargs="+", type=Path, help="draw the curves of these run files (stdout saved) to --out")
    p.add_argument("--out", type=Path, default=Path("parallax_curves.png"))
    p.add_argument("--set", help="a family set (geopose_ray/synthetic/family.py)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="default: the space's max_epochs")
    p.add_argument("--set-key", action="append", default=[], metavar="KEY=VALUE", help="fix a Config key")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--views-out", type=Path, default=None, help="save each seed's test views to PATH.seedN.pkl")
    p.add_argument("--combine", nargs="+", type=Path, help="score the mean of these saved members' views")
    p.add_argument("--bn-tiles", type=Path, help="a saved model: scored with statistics of 64, 32, 16, 8 tiles")
    p.add_argument("--rebn", type=Path, help="a saved model (PATH.seedN.pt): scored before and after precise_bn")
    p.add_argument("--seen-unseen", type=Path, help="a saved model (PATH.seedN.pt): scored view by view on its "
                   "training tiles, its validation fold and the test truth")  # fmt: skip
    a = p.parse_args()
    if a.plot:
        plot(a.plot, a.out)
        return
    if a.combine:
        print(json.dumps(sig(combine(a.combine))), flush=True)
        return
    if not a.set:
        p.error("--set is required (or --plot)")
    if a.bn_tiles:
        for rec in bn_tiles(a.bn_tiles, generate_named(a.set, work_dir(a.work) / "family" / a.set)):
            print(json.dumps(sig(rec)), flush=True)
        return
    if a.seen_unseen:
        data = generate_named(a.set, work_dir(a.work) / "family" / a.set)
        print(json.dumps(sig(seen_unseen(a.seen_unseen, data))), flush=True)
        return
    if a.rebn:
        print(json.dumps(sig(rebn(a.rebn, generate_named(a.set, work_dir(a.work) / "family" / a.set)))), flush=True)
        return
    from geopose_ray.tune.space import parse_overrides

    keys = parse_overrides(a.set_key)  # YAML values, as run_search.py --set reads them ("full" stays a string)
    data = generate_named(a.set, work_dir(a.work) / "family" / a.set)
    _, measured, lines = train_config(data, 0, a.epochs, keys)
    print(json.dumps({"set": a.set, "stats": measured.__dict__, "derived": lines, "keys": keys}), flush=True)
    for seed in (int(s) for s in a.seeds.split(",")):
        print(json.dumps(sig(run_seed(data, seed, a.epochs, keys, a.views_out))), flush=True)


if __name__ == "__main__":
    main()
