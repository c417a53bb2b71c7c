"""Train one config in one process, without Ray: the quickest way to try a config or debug a model.

    python -m geopose_ray.train --config FILE [--data DIR] [--cache DIR] [--epochs N] [--out DIR] [--fold K]

FILE holds flat `key: value` config values, or is a search-space YAML (its parameters' defaults
plus its fixed values are used). Without --data the embedded synthetic set is used (generated on
first use). Prints one line per epoch and keeps the best checkpoint (by validation score) in --out.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from geopose_ray import paths
from geopose_ray.checkpoint import save_state
from geopose_ray.config import Config, load_yaml_config
from geopose_ray.convert import ensure_cache
from geopose_ray.data.transforms import build_train_transform_from_config
from geopose_ray.device import autocast_dtype
from geopose_ray.errors import HelpFormatter, InputError, run_cli
from geopose_ray.models import pretrained
from geopose_ray.optim import build_optimizer, build_scheduler
from geopose_ray.synthetic import ensure_default
from geopose_ray.train_loop import NonFiniteLossError, fit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m geopose_ray.train", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="YAML of flat config values or a search space")
    p.add_argument("--data", help="DrivenData-layout folder (default: the embedded synthetic set)")
    p.add_argument("--cache", help="conversion cache folder (default: DATA/.geopose_cache)")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--out", help="where the best checkpoint goes (default: <home>/train/<config name>)")
    p.add_argument("--fold", type=int, help="validation fold (overrides the config's fold)")
    return p.parse_args(argv)


def read_flat_config(path: str | Path) -> dict[str, Any]:
    """A flat config file as it is; a search space's default trial (its `epochs` = the budget)."""
    from geopose_ray.tune.space import is_space_file, load_space

    if is_space_file(path):
        return load_space(path).defaults()
    return load_yaml_config(path)


def load_config(args: argparse.Namespace) -> Config:
    """Config from the YAML plus command-line overrides; every bad value names the YAML file."""
    flat = read_flat_config(args.config)
    cache = str(Path(args.cache).resolve()) if args.cache else None
    overrides: dict[str, Any] = {"epochs": args.epochs, "fold": args.fold, "cache_dir": cache}
    flat.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = Config.from_dict(flat)
        # fail before any data work on names the training core would only reject later
        autocast_dtype(cfg.train.precision, torch.device("cpu"))
        optimizer = build_optimizer(torch.nn.Linear(1, 1), cfg.optim)
        build_scheduler(optimizer, cfg.optim, steps_per_epoch=1, epochs=max(1, cfg.train.epochs))
        build_train_transform_from_config(cfg.data)
    except (ValueError, TypeError) as e:
        raise InputError(args.config, str(e)) from None
    if cfg.train.epochs < 1:
        raise InputError(args.config, f"epochs must be >= 1, got {cfg.train.epochs}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args)
    if args.data:
        cfg = cfg.replace(data_dir=str(Path(args.data).resolve()))
    elif not cfg.data.data_dir:
        cfg = cfg.replace(data_dir=str(ensure_default(paths.default_data_dir())))
    ensure_cache(cfg.data.data_dir, cfg.data.cache_dir or None)  # a local process pool; fit never converts
    m = cfg.model
    if pretrained.needs_hub(m):  # downloaded once, then read offline
        pretrained.ensure([(m.encoder, m.encoder_weights)], m.weights_cache)
    out = Path(args.out) if args.out else paths.home() / "train" / Path(args.config).stem
    best = {"score": -math.inf, "epoch": 0}

    def reporter(metrics: dict[str, float], state_fn: Any) -> None:
        print(
            f"epoch {int(metrics['epoch'])}/{cfg.train.epochs}  train_loss {metrics['train_loss']:.4f}  "
            f"val_loss {metrics['val_loss']:.4f}  score {metrics['score']:.4f}  "
            f"lr {metrics['lr']:.2e}  {metrics['imgs_per_s']:.1f} img/s  nonfinite {int(metrics['nonfinite_steps'])}",
            flush=True,
        )
        if state_fn is not None and math.isfinite(metrics["score"]) and metrics["score"] > best["score"]:
            save_state(out, state_fn())
            best.update(score=metrics["score"], epoch=int(metrics["epoch"]))

    try:
        fit(cfg, reporter=reporter)
    except NonFiniteLossError as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    if best["epoch"]:
        print(f"best score {best['score']:.4f} at epoch {best['epoch']}: {out}")
    else:
        print("no finite validation score: no checkpoint saved", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
