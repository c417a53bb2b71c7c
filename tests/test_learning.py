"""Quality: the embedded default's default config learns (not a timed test).

The embedded search space's defaults train in one process for a short budget on a small synthetic
set; validation `agl_r2` and `vflow_r2` must rise above floors taken from the learning study
(docs/LEARNING.md). A change that stops the model learning height, or the dense direction head
learning the angle, fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from geopose_ray.config import Config
from geopose_ray.convert import ensure_cache, serial_map
from geopose_ray.data import cache, stats
from geopose_ray.synthetic import generate
from geopose_ray.train_loop import fit
from geopose_ray.tune.space import load_space

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"
AGL_R2_FLOOR = 0.3  # measured 0.53 after these 160 steps (vflow_r2 0.28, EMA weights); the mean scores 0
VFLOW_R2_FLOOR = 0.0  # needs the angle: a random angle scores below 0 (the global head: -0.6)


def default_trial(data: Path, **flat) -> Config:
    """The default space's default trial on `data` (converted here), with its derived values."""
    cache_dir = ensure_cache(data, map_fn=serial_map, progress=False)
    space, _ = load_space(SPACE).with_data(stats.from_cache(cache.load_cache(cache_dir, "train")))
    return Config.from_dict({**space.defaults(), "data_dir": str(data), **flat})


@pytest.mark.slow
def test_default_config_learns_height_and_flow(tmp_path: Path):
    """On the default place folds: the validation tiles show places that training never saw."""
    data = generate(tmp_path / "set", size=128, per_city=30, test_per_city=0, seed=11)
    cfg = default_trial(data, epochs=8, threads=2, max_val_samples=16)
    assert cfg.data.fold_mode == "place"
    history: list[dict[str, float]] = []
    fit(cfg, reporter=lambda metrics, _state: history.append(metrics))
    best = max(history, key=lambda m: m["score"])
    print({k: round(best[k], 3) for k in ("epoch", "score", "agl_r2", "vflow_r2", "angle_err_deg")})
    assert best["agl_r2"] > AGL_R2_FLOOR, history
    assert best["vflow_r2"] > VFLOW_R2_FLOOR, history


TALL_SEEDS = (0, 1)
TALL_EPOCHS = 16  # at 8 the angle had not started (78-82 degrees) with either seed
# measured 2026-12-03 (half turns, 16 epochs): agl_r2 0.569 / 0.566, angle error 47.6 / 31.1
# degrees, vflow_r2 -0.214 / 0.299; with the derived centred crops, direction weight and rate
# (3f72f5b): agl_r2 0.560 / 0.570, angle error 50.0 / 18.4 degrees, vflow_r2 -0.148 / 0.411.
# The vflow spread (0.51, then 0.56) is the open goal, not asserted.
TALL_AGL_R2_FLOOR = 0.4
TALL_ANGLE_ERR_CEIL = 60.0  # degrees, mean over the validation tiles; a guess scores 90
TALL_AGL_SPREAD = 0.1  # max - min of the two seeds' agl_r2


@pytest.mark.slow
def test_default_config_learns_tall_sparse_parallax_with_two_seeds(tmp_path: Path):
    """Tall, sparse buildings that lean up to a third of the tile, each place seen from 4 angles:
    the case where the flow head used to settle on one direction fixed in its input frame (the
    angle error stayed near 90 degrees whatever the seed) until half turns
    (docs/LEARNING.md, 'Half turns'). Both seeds must learn height and angle, and their heights
    land close; how far their flows land apart is measured above, not yet bounded."""
    data = generate(tmp_path / "tall", size=128, per_city=24, test_per_city=0, seed=21, zoom=0.5, views=4, style="tall")
    finals = []
    for seed in TALL_SEEDS:
        cfg = default_trial(data, epochs=TALL_EPOCHS, threads=2, seed=seed, max_val_samples=24)
        assert cfg.data.half_turns and cfg.data.crop > 64  # derived from the tall buildings
        history: list[dict[str, float]] = []
        fit(cfg, reporter=lambda metrics, _state, h=history: h.append(metrics))
        finals.append(history[-1])
        print(seed, {k: round(history[-1][k], 3) for k in ("score", "agl_r2", "vflow_r2", "angle_err_deg")})
    for final in finals:
        assert final["agl_r2"] > TALL_AGL_R2_FLOOR, finals
        assert final["angle_err_deg"] < TALL_ANGLE_ERR_CEIL, finals
    values = [f["agl_r2"] for f in finals]
    assert max(values) - min(values) <= TALL_AGL_SPREAD, finals
