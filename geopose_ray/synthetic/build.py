"""Write the synthetic city as an exact DrivenData layout (docs/GEOPOSE.md, 'Data layout').

    OUT/train/{CITY}_{id}_RGB.j2k, _AGL.tif, _VFLOW.json     OUT/geopose_train.csv (id, agl, json, rgb)
    OUT/test/{CITY}_{id}_RGB.j2k                              OUT/geopose_test.csv  (id, rgb)
    OUT/truth/{CITY}_{id}_AGL.tif, _VFLOW.json (test tiles)   OUT/metadata.csv      (id, city, gsd, group)
    OUT/synthetic.json                                        parameters; "complete": true comes last

Train tiles come in groups of `views` acquisitions (different angle, scale, crop and, optionally,
GSD) of one scene, pairs by default; the `group` column names the scene so leak-aware folds can
keep a scene's views in one fold. `style` picks the look of the cities (styles.STYLE_SETS).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from geopose_ray.atomic import atomic_path, atomic_write_text
from geopose_ray.data.io import VFlow, write_agl_cm, write_rgb_j2k, write_vflow
from geopose_ray.errors import InputError
from geopose_ray.synthetic.planning import DEFAULT_CROP_JITTER, DEFAULT_VIEWS, TilePlan, check_views, plan
from geopose_ray.synthetic.scene import zoom_for
from geopose_ray.synthetic.styles import style_of
from geopose_ray.synthetic.tiles import render_tile, scene_for

__all__ = ["TilePlan", "ensure_default", "generate", "plan", "render_tile", "scene_for"]

MANIFEST = "synthetic.json"
LOCK = ".synthetic.lock"  # concurrent generate() calls on one folder wait for each other
FORMAT_VERSION = 1  # bump when the generator's output changes, so old sets are regenerated
MIN_SIZE = 16  # px
# The embedded default (docs/LEARNING.md): hundreds of small tiles, so that image-level labels are
# seen often enough to generalise and the set is written in seconds.
DEFAULT_SIZE, DEFAULT_PER_CITY, DEFAULT_TEST_PER_CITY = 128, 60, 10
# Per-view settings; the manifest names them only when they differ, so older sets stay complete.
VIEW_DEFAULTS: dict[str, Any] = {
    "views": DEFAULT_VIEWS,
    "gsd_jitter": 0.0,
    "crop_jitter": DEFAULT_CROP_JITTER,
    "style": "gentle",
}


def generate(
    out_dir: str | Path,
    size: int = DEFAULT_SIZE,
    per_city: int = DEFAULT_PER_CITY,
    test_per_city: int = DEFAULT_TEST_PER_CITY,
    seed: int = 0,
    zoom: float | None = None,
    views: int = DEFAULT_VIEWS,
    gsd_jitter: float = 0.0,
    crop_jitter: float = DEFAULT_CROP_JITTER,
    style: str = "gentle",
) -> Path:
    """Write the set into `out_dir` (created); a complete set with the same parameters is kept.

    `zoom` multiplies building sizes (px) and heights (m); None: `zoom_for(size)`, which keeps
    a 64 px tile's parallax at a few px. Larger zooms put fewer, larger buildings in a tile.
    `views` train tiles per place, `gsd_jitter` relative GSD spread between them, `crop_jitter`
    their crop offset (fraction of the tile), `style` the look (styles.STYLE_SETS)."""
    if size < MIN_SIZE or per_city < 1 or test_per_city < 0:
        raise ValueError(
            f"need size >= {MIN_SIZE}, per_city >= 1, test_per_city >= 0; got {size}, {per_city}, {test_per_city}"
        )
    check_views(views, gsd_jitter, crop_jitter)
    style_of(style)
    out = Path(out_dir)
    params: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "size": size,
        "per_city": per_city,
        "test_per_city": test_per_city,
        "seed": seed,
        "zoom": round(zoom_for(size) if zoom is None else float(zoom), 4),
    }
    chosen = {
        "views": views,
        "gsd_jitter": float(gsd_jitter),
        "crop_jitter": float(crop_jitter),
        "style": style,
    }
    params |= {k: v for k, v in chosen.items() if v != VIEW_DEFAULTS[k]}  # default sets: manifest as before
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    _refuse_foreign(out)
    with _locked(out):
        if _complete(out, params):
            return out
        _clear_previous(out, params)
        tiles = _plan_of(params)
        scene, scene_seed = None, None
        for tile in tiles:  # the acquisitions of one scene are consecutive: build each scene once
            if tile.scene_seed != scene_seed:
                scene, scene_seed = scene_for(tile, size, params["zoom"]), tile.scene_seed
            _write_tile(out, tile, *render_tile(tile, size, scene, params["zoom"]))
        _write_tables(out, tiles)
        _write_manifest(out, params, complete=True)
    return out


def _plan_of(params: dict[str, Any]) -> list[TilePlan]:
    """The plan a manifest's parameters stand for (keys left out take their defaults)."""
    extra = {k: params.get(k, default) for k, default in VIEW_DEFAULTS.items()}
    return plan(params["per_city"], params["test_per_city"], params["seed"], **extra)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_tile(out: Path, tile: TilePlan, rgb: np.ndarray, agl: np.ndarray) -> None:
    vflow = VFlow(scale=tile.scale, angle=tile.angle)
    write_rgb_j2k(out / tile.split / f"{tile.stem}_RGB.j2k", rgb)
    labels = out / ("train" if tile.split == "train" else "truth")
    write_agl_cm(labels / f"{tile.stem}_AGL.tif", agl)
    write_vflow(labels / f"{tile.stem}_VFLOW.json", vflow)


def _write_tables(out: Path, tiles: list[TilePlan]) -> None:
    train = [t for t in tiles if t.split == "train"]
    test = [t for t in tiles if t.split == "test"]
    _write_csv(
        out / "geopose_train.csv",
        ("id", "agl", "json", "rgb"),
        [(t.id, f"{t.stem}_AGL.tif", f"{t.stem}_VFLOW.json", f"{t.stem}_RGB.j2k") for t in train],
    )
    if test:  # a set without test tiles has no test table (data.layout.has_split)
        _write_csv(out / "geopose_test.csv", ("id", "rgb"), [(t.id, f"{t.stem}_RGB.j2k") for t in test])
    _write_csv(
        out / "metadata.csv",
        ("id", "city", "gsd", "group"),
        [(t.id, t.city, f"{t.gsd:.4f}", t.group) for t in tiles],
    )


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _complete(out: Path, params: dict[str, Any]) -> bool:
    """Manifest matches and every tile file of the plan exists (cheap: no decoding)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return False
    if {k: v for k, v in manifest.items() if k != "complete"} != params:
        return False
    tables = ["geopose_train.csv", "metadata.csv"] + (["geopose_test.csv"] if params["test_per_city"] else [])
    tiles = _plan_of(params)
    return all((out / name).is_file() for name in tables) and all(
        (out / folder / f"{t.stem}_{suffix}").is_file() for t in tiles for folder, suffix in _files_of(t)
    )


def _files_of(tile: TilePlan) -> list[tuple[str, str]]:
    labels = "train" if tile.split == "train" else "truth"
    return [(tile.split, "RGB.j2k"), (labels, "AGL.tif"), (labels, "VFLOW.json")]


def _refuse_foreign(out: Path) -> None:
    """Never write over a data set this module did not make (e.g. the real one)."""
    if not (out / MANIFEST).is_file() and ((out / "geopose_train.csv").exists() or (out / "train").exists()):
        raise InputError(out, f"holds a data set without {MANIFEST}; refusing to overwrite it")


def _clear_previous(out: Path, params: dict[str, Any]) -> None:
    """Remove an older synthetic set. The manifest goes first, marked incomplete: an interrupted
    rewrite never looks complete, yet the folder stays recognisably ours."""
    _write_manifest(out, params, complete=False)
    for folder in ("train", "test", "truth"):
        shutil.rmtree(out / folder, ignore_errors=True)
    for name in ("geopose_train.csv", "geopose_test.csv", "metadata.csv"):
        (out / name).unlink(missing_ok=True)


def _write_manifest(out: Path, params: dict[str, Any], complete: bool) -> None:
    atomic_write_text(out / MANIFEST, json.dumps({**params, "complete": complete}, indent=1))


def ensure_default(data_dir: Path) -> Path:
    """The embedded synthetic set in `data_dir`, generated (with the generator's defaults, as
    every entry point) unless a data set is already there. A synthetic set written with other
    parameters (an older default) is regenerated; a foreign set is used as it is."""
    data_dir = Path(data_dir)
    if (data_dir / MANIFEST).is_file() or not (data_dir / "geopose_train.csv").is_file():
        print(f"synthetic data set: {data_dir} (written when missing or outdated)", file=sys.stderr)
        generate(data_dir)
    return data_dir
