"""The weight-EMA study: validation score of the raw weights against moving averages, per epoch.

    python bench/ema.py --out docs/learning/ema                  # every run, then the plot
    python bench/ema.py --only r10t_lr3e-3_s1 --out docs/learning/ema

Each run trains one config of the embedded default's space on the embedded default's synthetic
set (learning.py's `s128x60`) for the smoke budget (20 epochs x 20 steps) with `ema_decay: 0`,
so `fit` validates the raw weights; side averages follow the weights after every step and are
validated on the same fold after every epoch. Averages: timm's warm-up with power 2/3 (its
default), with power 1/2 (what `train_loop.build_ema` uses), and a fixed decay of 0.95.
`<run>.json` keeps each curve; `ema_curves.png` plots the score of each against the epoch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.learning import BASE, R10T, make_set, run_and_collect  # noqa: E402

# name -> Config overrides of learning.BASE (the smoke space's fixed keys)
RUNS: dict[str, dict[str, Any]] = {
    "r10t_lr3e-3_s1": {**R10T, "lr": 3e-3, "seed": 1},
    "r18_lr2e-3_s1": {"encoder": "resnet18", "decoder_channels": 8, "lr": 2.1e-3, "seed": 1},
    "r10t_lr3e-3_s2": {**R10T, "lr": 3e-3, "seed": 2},
    "r10t_huber_lr4e-3_s2": {**R10T, "agl_loss": "huber", "huber_delta": 5.0, "lr": 4e-3, "seed": 2},
}
AVERAGES: dict[str, dict[str, Any]] = {  # ModelEmaV3 keyword arguments
    "power_2/3": {"decay": 0.9999, "use_warmup": True},
    "power_1/2": {"decay": 0.9999, "use_warmup": True, "warmup_power": 0.5},
    "fixed_0.95": {"decay": 0.95},
}


def run(name: str, data_root: Path) -> dict[str, Any]:
    """Train one run; returns {"name", "config", "curve": [{epoch, wall_s, raw, <average>...}]}."""
    import torch
    from timm.utils import ModelEmaV3

    from geopose_ray.config import Config
    from geopose_ray.convert import ensure_cache
    from geopose_ray.data.loaders import build_loaders, split_samples
    from geopose_ray.losses import build_criterion
    from geopose_ray.train_loop import fit, validate

    overrides = {**BASE, "epochs": 20, **RUNS[name], "ema_decay": 0.0}
    cfg = Config.from_dict({**overrides, "data_dir": str(make_set(data_root, "s128x60")), "threads": 1})
    ensure_cache(cfg.data.data_dir, cfg.data.cache_dir or None)
    train, val = split_samples(cfg)
    val_dl = build_loaders(cfg, train, val, 0, 1)[1]
    criterion = build_criterion(cfg.loss)
    model: dict[str, torch.nn.Module] = {}
    averages: dict[str, ModelEmaV3] = {}

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        model["raw"] = m
        averages.update({k: ModelEmaV3(m, **kw) for k, kw in AVERAGES.items()})
        return m

    def follow(step: int, loss: torch.Tensor) -> torch.Tensor:  # before step `step`: after step - 1
        for ema in averages.values():
            ema.update(model["raw"], step=step)
        return loss

    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def reporter(metrics: dict[str, float], _state: Any) -> None:
        row = {"epoch": metrics["epoch"], "wall_s": round(time.perf_counter() - t0, 1), "raw": metrics["score"]}
        for key, ema in averages.items():
            row[key] = validate(ema.module, val_dl, criterion, torch.device("cpu"), "fp32")["score"]
        model["raw"].train()
        curve.append(row)
        print(f"  {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)

    fit(cfg, reporter=reporter, wrap_model=wrap, loss_hook=follow)
    return {"name": name, "config": overrides, "curve": curve}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], sorted(results.items())):
        epochs = [r["epoch"] for r in res["curve"]]
        for key in ("raw", *AVERAGES):
            ax.plot(epochs, [r[key] for r in res["curve"]], label=key, lw=1.5 if key != "raw" else 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.2, 0.85)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation score")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/learning/ema", help="folder of the results and the plot")
    p.add_argument("--data-root", default="runs/study", help="where the synthetic set is generated")
    p.add_argument("--only", nargs="*", choices=sorted(RUNS), help="runs (default: all)")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    names = [] if args.plot_only else args.only or list(RUNS)
    results = run_and_collect(out, names, lambda name: run(name, Path(args.data_root)))
    plot(results, out / "ema_curves.png")
    for name, res in sorted(results.items()):
        at = {int(r["epoch"]): r for r in res["curve"]}
        for epoch in (5, 10, 20):
            if epoch in at:
                print(f"{name:24s} epoch {epoch:2d}  " + "  ".join(
                    f"{k} {at[epoch][k]:.3f}" for k in ("raw", *AVERAGES)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
