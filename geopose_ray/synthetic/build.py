"""Write the synthetic city as an exact DrivenData layout (GEOPOSE_SPEC section 1).

    OUT/train/{CITY}_{id}_RGB.j2k, _AGL.tif, _VFLOW.json     OUT/geopose_train.csv (id, agl, json, rgb)
    OUT/test/{CITY}_{id}_RGB.j2k                              OUT/geopose_test.csv  (id, rgb)
    OUT/truth/{CITY}_{id}_AGL.tif, _VFLOW.json (test tiles)   OUT/metadata.csv      (id, city, gsd, group)
    OUT/synthetic.json                                        parameters; "complete": true comes last

Train tiles come in pairs of acquisitions (different angle, scale and crop) of one scene; the
`group` column names the scene so leak-aware folds can keep both in one fold.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import shutil
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geopose_ray.atomic import atomic_path, atomic_write_text
from geopose_ray.constants import CITIES
from geopose_ray.data.io import VFlow, write_agl_cm, write_rgb_j2k, write_vflow
from geopose_ray.errors import InputError
from geopose_ray.synthetic.render import render_oblique
from geopose_ray.synthetic.scene import STYLES, Scene, make_scene, zoom_for

MANIFEST = "synthetic.json"
LOCK = ".synthetic.lock"  # concurrent generate() calls on one folder wait for each other
FORMAT_VERSION = 1  # bump when the generator's output changes, so old sets are regenerated
VIEWS_PER_SCENE = 2  # train acquisitions per scene (test tiles: one scene each)
ID_ALPHABET = string.ascii_letters + string.digits
NODATA_FRAC = (0.001, 0.005)  # share of AGL pixels without a (simulated) lidar return
NOISE_STD = 3.0  # uint8 levels of sensor noise
MIN_SIZE = 16  # px
SPLIT_SEED = {"train": 0, "test": 1}
# The embedded default (docs/LEARNING.md): hundreds of small tiles, so that image-level labels are
# seen often enough to generalise and the set is written in seconds.
DEFAULT_SIZE, DEFAULT_PER_CITY, DEFAULT_TEST_PER_CITY = 128, 60, 10


@dataclass(frozen=True)
class TilePlan:
    """Everything that decides one tile, drawn from the seed before any pixel is rendered."""

    id: str
    city: str
    split: str  # "train" | "test"
    group: str  # scene name, shared by the acquisitions of one scene
    gsd: float  # m/px (per scene)
    scale: float  # px/m
    angle: float  # rad in [0, 2 pi)
    scene_seed: tuple[int, ...]  # entropy of the scene's geometry
    view: int  # acquisition index within the scene

    @property
    def stem(self) -> str:
        return f"{self.city}_{self.id}"


def plan(per_city: int = 8, test_per_city: int = 2, seed: int = 0) -> list[TilePlan]:
    """The tiles of a set, city by city, train before test; ids unique across the set."""
    ids = _ids(np.random.default_rng([seed, 0x1D5]), len(CITIES) * (per_city + test_per_city))
    tiles: list[TilePlan] = []
    for c, city in enumerate(CITIES):
        style = STYLES[city]
        for split, count, views in (("train", per_city, VIEWS_PER_SCENE), ("test", test_per_city, 1)):
            for s in range(-(-count // views)):
                scene_seed = (seed, c, SPLIT_SEED[split], s)
                rng = np.random.default_rng([*scene_seed, 0])
                gsd = round(float(rng.uniform(*style.gsd)), 4)
                for v in range(min(views, count - s * views)):
                    tiles.append(
                        TilePlan(
                            id=ids[len(tiles)],
                            city=city,
                            split=split,
                            group=f"{city}_{split}{s:03d}",
                            gsd=gsd,
                            scale=float(rng.uniform(*style.scale)),
                            angle=float(rng.uniform(0.0, 2 * np.pi)),
                            scene_seed=scene_seed,
                            view=v,
                        )
                    )
    return tiles


def _ids(rng: np.random.Generator, n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        tile_id = "".join(rng.choice(list(ID_ALPHABET), 6))
        if tile_id not in seen:
            seen.add(tile_id)
            out.append(tile_id)
    return out


def _margin(tile: TilePlan, size: int, zoom: float) -> int:
    """px of scene around the tile: the largest parallax plus the crop jitter."""
    style = STYLES[tile.city]
    return int(np.ceil(style.height_max * zoom * style.scale[1])) + size // 8 + 2


def scene_for(tile: TilePlan, size: int, zoom: float | None = None) -> Scene:
    """The ground-plane scene of `tile` (shared by all acquisitions of its group); `zoom`
    multiplies lengths and heights (None: `zoom_for(size)`)."""
    zoom = zoom_for(size) if zoom is None else zoom
    n_px = size + 2 * _margin(tile, size, zoom)
    rng = np.random.default_rng([*tile.scene_seed, 1])
    return make_scene(rng, STYLES[tile.city], n_px, tile.gsd, zoom)


def render_tile(
    tile: TilePlan, size: int, scene: Scene | None = None, zoom: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 RGB with noise and (size, size) float32 AGL m in the image frame
    with NaN no-data. The scene is larger than the tile, so parallax enters from outside."""
    zoom = zoom_for(size) if zoom is None else zoom
    scene = scene if scene is not None else scene_for(tile, size, zoom)
    margin, jitter = _margin(tile, size, zoom), size // 8  # jitter: crop offset between acquisitions
    rgb, agl = render_oblique(scene.height, scene.albedo, tile.scale, tile.angle)
    rng = np.random.default_rng([*tile.scene_seed, 2, tile.view])
    r0, c0 = margin + rng.integers(-jitter, jitter + 1, 2)
    rgb, agl = rgb[r0 : r0 + size, c0 : c0 + size], agl[r0 : r0 + size, c0 : c0 + size].copy()
    noisy = rgb * rng.uniform(0.92, 1.08) + rng.normal(0.0, NOISE_STD, rgb.shape)
    rgb = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    n_nodata = max(1, round(rng.uniform(*NODATA_FRAC) * size * size))
    agl.ravel()[rng.choice(size * size, n_nodata, replace=False)] = np.nan
    return rgb, agl


def generate(
    out_dir: str | Path,
    size: int = DEFAULT_SIZE,
    per_city: int = DEFAULT_PER_CITY,
    test_per_city: int = DEFAULT_TEST_PER_CITY,
    seed: int = 0,
    zoom: float | None = None,
) -> Path:
    """Write the set into `out_dir` (created); a complete set with the same parameters is kept.

    `zoom` multiplies building sizes (px) and heights (m); None: `zoom_for(size)`, which keeps
    a 64 px tile's parallax at a few px. Larger zooms put fewer, larger buildings in a tile."""
    if size < MIN_SIZE or per_city < 1 or test_per_city < 0:
        raise ValueError(
            f"need size >= {MIN_SIZE}, per_city >= 1, test_per_city >= 0; got {size}, {per_city}, {test_per_city}"
        )
    out = Path(out_dir)
    params = {
        "format": FORMAT_VERSION,
        "size": size,
        "per_city": per_city,
        "test_per_city": test_per_city,
        "seed": seed,
        "zoom": round(zoom_for(size) if zoom is None else float(zoom), 4),
    }
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    _refuse_foreign(out)
    with _locked(out):
        if _complete(out, params):
            return out
        _clear_previous(out, params)
        tiles = plan(per_city, test_per_city, seed)
        scene, scene_seed = None, None
        for tile in tiles:  # the acquisitions of one scene are consecutive: build each scene once
            if tile.scene_seed != scene_seed:
                scene, scene_seed = scene_for(tile, size, params["zoom"]), tile.scene_seed
            _write_tile(out, tile, *render_tile(tile, size, scene, params["zoom"]))
        _write_tables(out, tiles)
        _write_manifest(out, params, complete=True)
    return out


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


def _complete(out: Path, params: dict[str, float]) -> bool:
    """Manifest matches and every tile file of the plan exists (cheap: no decoding)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return False
    if {k: manifest.get(k) for k in params} != params:
        return False
    tables = ["geopose_train.csv", "metadata.csv"] + (["geopose_test.csv"] if params["test_per_city"] else [])
    tiles = plan(params["per_city"], params["test_per_city"], params["seed"])
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


def _clear_previous(out: Path, params: dict[str, float]) -> None:
    """Remove an older synthetic set. The manifest goes first, marked incomplete: an interrupted
    rewrite never looks complete, yet the folder stays recognisably ours."""
    _write_manifest(out, params, complete=False)
    for folder in ("train", "test", "truth"):
        shutil.rmtree(out / folder, ignore_errors=True)
    for name in ("geopose_train.csv", "geopose_test.csv", "metadata.csv"):
        (out / name).unlink(missing_ok=True)


def _write_manifest(out: Path, params: dict[str, float], complete: bool) -> None:
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
