"""Other poolings of the dense flow into a tile's direction, on saved models: no weight changed.

    python bench/poolings.py --set tune-tall-384 V.seed0.pt [V.seed1.pt ...]   # from parallax --views-out

The default direction is the MAG-weighted mean of the flow's unit vectors
(`models.heads.pooled_direction`). Each model's test tiles go through the 8 D4 views once; the
same outputs are then pooled five ways and scored like `bench/parallax.py` scores them (single
view, rotations, reflections, D4): is the single view's error in the flow, or in its pooling?
One JSON line per model: per pooling and view group, the official score and the mean angle
error (degrees). Not part of CI: about a minute per model on 2 cores (docs/LEARNING.md,
'Training on the statistics inference uses, and other poolings of the flow').
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import sig, work_dir
from bench.parallax import GROUPS, read_test_tiles


def poolings(flow: Tensor, mag: Tensor) -> dict[str, Tensor]:
    """(2, H, W) flow px and (1, H, W) MAG px -> {name: (2,) direction vector}."""
    f, m = flow.double(), mag.double().clamp_min(0.0)[0]
    unit = f / f.square().sum(0).add(1e-6).sqrt()
    top = m >= torch.quantile(m.flatten(), 0.95)
    return {
        "mag_unit": (m * unit).sum((1, 2)),  # the default
        "mag2_unit": (m * m * unit).sum((1, 2)),
        "flow": f.sum((1, 2)),
        "mag_flow": (m * f).sum((1, 2)),
        "top5_unit": (top * unit).sum((1, 2)),
    }


def pooled_views(model: torch.nn.Module, data_dir: Path, cache_dir: Path) -> list[dict[str, Any]]:
    """Every test tile through each D4 view: un-rotated AGL, scale and every pooling's direction."""
    from geopose_ray.constants import city_index
    from geopose_ray.tta import D4_VIEWS, apply_view, invert_direction, invert_view

    tiles = []
    for s, x, truth in read_test_tiles(data_dir, cache_dir):
        views = {}
        with torch.no_grad():
            for v in D4_VIEWS:
                out = model(apply_view(x, v)[None], torch.tensor([float(s.gsd)]), torch.tensor([city_index(s.city)]))
                dirs = poolings(out["flow"][0], out["mag"][0])
                views[v.name] = (
                    invert_view(out["agl"][0, 0], v).numpy(),
                    float(out["scale"][0]),
                    {k: invert_direction(d.float(), v).numpy() for k, d in dirs.items()},
                )
        tiles.append({**truth, "views": views})
    return tiles


def score(tiles: list[dict[str, Any]], pooling: str, names: tuple[str, ...]) -> dict[str, float]:
    """Official score and mean angle error of the views `names`, unit directions averaged."""
    from geopose_ray.metrics import GeoposeScore

    metric, errors = GeoposeScore(), []
    for t in tiles:
        agl = np.mean([t["views"][n][0] for n in names], axis=0)
        scale = float(np.mean([t["views"][n][1] for n in names]))
        d = np.sum([u / max(np.linalg.norm(u), 1e-12) for u in (t["views"][n][2][pooling] for n in names)], axis=0)
        angle = math.atan2(d[0], d[1])
        errors.append(abs(math.remainder(angle - t["angle"], 2 * math.pi)))
        metric.update(t["city"], t["agl"], agl, t["scale"], t["angle"], scale, angle)
    return {"final": metric.compute()["final"], "angle_err_deg": math.degrees(float(np.mean(errors)))}


def main() -> None:
    import argparse

    from geopose_ray.config import Config
    from geopose_ray.models import build_model
    from geopose_ray.synthetic.family import generate_named

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, help="the family set the models were trained on")
    p.add_argument("models", nargs="+", type=Path, help="models saved by bench/parallax.py --views-out")
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    data = generate_named(a.set, work_dir(a.work) / "family" / a.set)
    for path in a.models:
        saved = torch.load(path, weights_only=False)
        cfg = Config.from_dict(saved["config"])
        model = build_model(cfg.model)
        model.load_state_dict(saved["model"])
        tiles = pooled_views(model.eval(), data, Path(cfg.data.cache_dir or data / ".geopose_cache"))
        rows = {k: {g: score(tiles, k, names) for g, names in GROUPS.items()} for k in tiles[0]["views"]["identity"][2]}
        print(json.dumps(sig({"model": str(path), **rows})), flush=True)


if __name__ == "__main__":
    main()
