"""The learning study: what makes the embedded default learnable, measured through `train_loop.fit`.

    python bench/learning.py --out docs/learning            # every setting, then the plots
    python bench/learning.py --only dense_r18 global_r18    # some settings (results are merged)
    python bench/learning.py --plot-only --out docs/learning

Each setting is a synthetic set (tile size, tiles per city, seed) plus Config overrides. It trains
in this process (no Ray), validates on full tiles of fold 0 after every epoch and records the
metrics against wall-clock seconds. `<setting>.json` in --out keeps each run; `learning_curves.png`
plots agl_r2, vflow_r2 and the score against seconds, one line per setting.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# (size px, train tiles per city, test tiles per city, seed, zoom or None) of each synthetic set
SETS: dict[str, tuple[int, int, int, int, float | None]] = {
    "s256x8": (256, 8, 2, 0, None),  # the old embedded default: 32 train tiles
    "s128x60": (128, 60, 10, 5, None),  # zoom sqrt(128/256) = 0.71
    "s128x60z1": (128, 60, 10, 5, 1.0),
    "s64x150": (64, 150, 10, 5, None),
}

BASE: dict[str, Any] = {  # the embedded default's fixed settings (search_spaces/smoke.yaml)
    "n_folds": 5,
    "encoder": "resnet18",
    "arch": "Unet",
    "direction_head": "dense",
    "crop": 64,
    "batch_size": 16,
    "epoch_samples": 320,  # 20 steps of 16 crops per epoch
    "val_batch_size": 16,
    "lr": 3e-3,
    "schedule": "cosine",
    "warmup_epochs": 0.5,
    "precision": "fp32",
    "photo_aug": "none",
    "encoder_weights": None,
    "mag_weight": 1.0,
    "dir_weight": 1.0,
    "scale_weight": 1.0,
    "epochs": 12,
}
OLD_WEIGHTS = {"mag_weight": 2.0, "dir_weight": 10.0, "scale_weight": 10.0}  # the baseline's 1/2/10/10

R10T = {"encoder": "tu-resnet10t", "decoder_channels": 8}  # the embedded default's model

# name -> (set, overrides of BASE)
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "old_default": ("s256x8", {"direction_head": "global", "crop": 128, "batch_size": 4, **OLD_WEIGHTS}),
    "global_oldw": ("s128x60", {"direction_head": "global", **OLD_WEIGHTS}),
    "global": ("s128x60", {"direction_head": "global"}),
    "dense_oldw": ("s128x60", OLD_WEIGHTS),
    "dense": ("s128x60", {}),
    "dense_dc8": ("s128x60", {"decoder_channels": 8}),
    "dense_r10t_dc8": ("s128x60", {"encoder": "tu-resnet10t", "decoder_channels": 8}),
    "dense_bs8": ("s128x60", {"batch_size": 8}),
    "dense_crop96": ("s128x60", {"crop": 96, "batch_size": 7}),  # ~ the same pixels per step
    "dense_noaug": ("s128x60", {"geo_aug": "none"}),
    "dense_lr1e-3": ("s128x60", {"lr": 1e-3}),
    "dense_lr1e-2": ("s128x60", {"lr": 1e-2}),
    "dense_zoom1": ("s128x60z1", {}),
    "dense_64px": ("s64x150", {}),
    "r10t_dc8_20ep": ("s128x60", {"encoder": "tu-resnet10t", "decoder_channels": 8, "epochs": 20}),
    # crop and batch at 20 steps per epoch, on the embedded default's encoder and decoder
    "r10t_bs8": ("s128x60", {**R10T, "batch_size": 8, "epoch_samples": 160}),
    "r10t_bs8_crop96": ("s128x60", {**R10T, "batch_size": 8, "crop": 96, "epoch_samples": 160}),
    "r10t_bs4": ("s128x60", {**R10T, "batch_size": 4, "epoch_samples": 80}),
    "r10t_bs4_crop128": ("s128x60", {**R10T, "batch_size": 4, "crop": 128, "epoch_samples": 80}),
    "r10t_dir3": ("s128x60", {**R10T, "dir_weight": 3.0}),
    "r10t_dir10": ("s128x60", {**R10T, "dir_weight": 10.0}),
    "r10t_bs8_dir3": ("s128x60", {**R10T, "batch_size": 8, "dir_weight": 3.0}),
    "r10t_dir3_20ep": ("s128x60", {**R10T, "dir_weight": 3.0, "epochs": 20}),  # the smoke budget
}
KEEP = (
    "epoch", "train_loss", "train_agl", "train_mag", "train_direction", "val_loss",
    "score", "agl_r2", "vflow_r2", "angle_err_deg", "scale_rel_err",
)  # fmt: skip


def make_set(root: Path, name: str) -> Path:
    from geopose_ray.synthetic import generate

    size, per_city, test_per_city, seed, zoom = SETS[name]
    return generate(root / name, size, per_city, test_per_city, seed, zoom)


def run_setting(name: str, data_root: Path, threads: int) -> dict[str, Any]:
    """Train one setting; returns {"name", "set", "config", "curve": [{wall_s, metrics...}]}."""
    from geopose_ray.config import Config
    from geopose_ray.convert import ensure_cache
    from geopose_ray.train_loop import fit

    set_name, overrides = SETTINGS[name]
    flat = {**BASE, **overrides, "data_dir": str(make_set(data_root, set_name)), "threads": threads}
    cfg = Config.from_dict(flat)
    ensure_cache(cfg.data.data_dir, cfg.data.cache_dir or None)  # conversion is not training time
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def reporter(metrics: dict[str, float], _state: Any) -> None:
        row = {"wall_s": round(time.perf_counter() - t0, 1), **{k: metrics.get(k) for k in KEEP}}
        curve.append(row)
        print(f"  {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if v is not None), flush=True)

    fit(cfg, reporter=reporter)
    return {"name": name, "set": set_name, "config": {**BASE, **overrides}, "curve": curve}


def plot(results: dict[str, dict], path: Path) -> None:
    """agl_r2, vflow_r2, score and the mean angle error against wall seconds, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("agl_r2", "vflow_r2", "score", "angle_err_deg")
    fig, axes = plt.subplots(1, 4, figsize=(21, 5), sharex=True)
    for i, (name, res) in enumerate(sorted(results.items())):
        xs = [r["wall_s"] for r in res["curve"]]
        style = {"color": plt.cm.tab20(i % 20), "ls": "--" if "global" in name or "old" in name else "-"}
        for ax, key in zip(axes, keys):
            ax.plot(xs, [r[key] for r in res["curve"]], marker="o", ms=3, label=name, **style)
    for ax, key in zip(axes, keys):
        ax.set_title(key)
        ax.set_xlabel("wall-clock s (one thread; two settings at once on 2 cores)")
        ax.set_ylim(*((0, 100) if key == "angle_err_deg" else (-0.5, 1.0)))
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results: dict[str, dict]) -> str:
    """Markdown rows: each setting's changes against BASE and its last and best epochs."""
    head = (
        "| setting | set | changes against the base | epochs x steps | wall s | score | agl_r2 | vflow_r2 "
        "| angle error deg | scale error | best score (epoch) |\n" + "|---" * 11 + "|\n"
    )
    rows = []
    for name, res in results.items():
        last, best = res["curve"][-1], max(res["curve"], key=lambda r: r["score"])
        changes = {k: v for k, v in res["config"].items() if BASE.get(k) != v} or "-"
        steps = math.ceil(res["config"]["epoch_samples"] / res["config"]["batch_size"])
        rows.append(
            f"| {name} | {res['set']} | {changes} | {int(last['epoch'])} x {steps} | {last['wall_s']:.0f} "
            f"| {last['score']:.3f} | {last['agl_r2']:.3f} | {last['vflow_r2']:.3f} "
            f"| {last['angle_err_deg']:.1f} | {last.get('scale_rel_err', math.nan):.3f} "
            f"| {best['score']:.3f} ({int(best['epoch'])}) |"
        )
    return head + "\n".join(rows) + "\n"


def run_and_collect(out: Path, names: list[str], run_one: Callable[[str], dict]) -> dict[str, dict]:
    """Run each of `names`, keep its result as `<out>/<name>.json`, and return every result the
    folder holds (earlier runs too: a study is run a few settings at a time)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / f"{name}.json").write_text(json.dumps(run_one(name), indent=1))
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", default="docs/learning", help="folder of the results (one JSON per setting) and the plot"
    )
    p.add_argument("--data-root", default="runs/study", help="where the synthetic sets are generated")
    p.add_argument("--only", nargs="*", choices=sorted(SETTINGS), help="settings to run (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as one trial of the search)")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)

    def one(name: str) -> dict[str, Any]:
        print(f"setting {name}", flush=True)
        return run_setting(name, Path(args.data_root), args.threads)

    results = run_and_collect(out, [] if args.plot_only else args.only or list(SETTINGS), one)
    plot(results, out / "learning_curves.png")
    (out / "table.md").write_text(table(results))
    for name, res in sorted(results.items()):
        last = res["curve"][-1]
        print(f"{name:20s} {last['wall_s']:7.0f} s  score {last['score']:.3f}  agl_r2 {last['agl_r2']:.3f}  "
              f"vflow_r2 {last['vflow_r2']:.3f}  angle {last['angle_err_deg']:.1f} deg")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
