"""The DrivenData layout (docs/GEOPOSE.md, 'Data layout') as a list of `Sample` records.

    DATA_DIR/train/{CITY}_{id}_RGB.j2k, _AGL.tif, _VFLOW.json
    DATA_DIR/test/{CITY}_{id}_RGB.j2k
    DATA_DIR/geopose_train.csv   id, agl, json, rgb   (file names relative to train/)
    DATA_DIR/geopose_test.csv    id, rgb
    DATA_DIR/metadata.csv        id, city, gsd        (m/px; train and test; optional `group`)

`load_split` checks the tables and that every listed file exists (cheap); `validate_samples`
opens every file (headers plus a small decode) so that a conversion that takes hours never
starts on a data set with one bad file in it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from geopose_ray.constants import CITIES
from geopose_ray.data import io
from geopose_ray.errors import InputError

SPLITS: tuple[str, ...] = ("train", "test")
SPLIT_CSV = {"train": "geopose_train.csv", "test": "geopose_test.csv"}
SPLIT_COLUMNS = {"train": ("id", "agl", "json", "rgb"), "test": ("id", "rgb")}
METADATA_CSV = "metadata.csv"
METADATA_COLUMNS = ("id", "city", "gsd")


@dataclass(frozen=True)
class Sample:
    id: str  # 6-character tile id, unique across cities
    city: str  # one of constants.CITIES
    gsd: float  # m/px
    split: str  # "train" | "test"
    rgb: Path
    agl: Path | None  # None for test tiles
    vflow: Path | None  # None for test tiles
    group: str = ""  # scene key for leak-aware folds: metadata.csv `group` column, if any

    @property
    def stem(self) -> str:
        """`{city}_{id}`: the file-name stem shared by a tile's RGB, AGL and VFLOW files."""
        return f"{self.city}_{self.id}"


def read_csv(path: Path, columns: Iterable[str]) -> pd.DataFrame:
    """A CSV as strings (ids like `001234` stay text), with the required columns checked."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(path, f"cannot parse CSV ({e.__class__.__name__})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; found {list(df.columns)}")
    return df


def has_split(data_dir: str | Path, split: str) -> bool:
    """Whether the data set ships this split at all (a training-only copy has no test CSV)."""
    return (Path(data_dir) / SPLIT_CSV[split]).is_file()


def load_metadata(data_dir: Path) -> dict[str, tuple[str, float, str]]:
    """id -> (city, gsd m/px, group), every row checked."""
    path = data_dir / METADATA_CSV
    df = read_csv(path, METADATA_COLUMNS)
    groups = df["group"] if "group" in df.columns else [""] * len(df)
    meta: dict[str, tuple[str, float, str]] = {}
    for tile_id, city, gsd_text, group in zip(df["id"], df["city"], df["gsd"], groups):
        tile_id, city = tile_id.strip(), city.strip()
        if tile_id in meta:
            raise InputError(path, f"duplicate id '{tile_id}'")
        if city not in CITIES:
            raise InputError(path, f"unknown city '{city}' for id '{tile_id}' (known: {', '.join(CITIES)})")
        try:
            gsd = float(gsd_text)
        except ValueError:
            gsd = math.nan
        if not (math.isfinite(gsd) and gsd > 0):
            raise InputError(path, f"gsd '{gsd_text}' for id '{tile_id}' is not a positive finite number")
        meta[tile_id] = (city, gsd, str(group).strip())
    return meta


def load_split(data_dir: str | Path, split: str) -> list[Sample]:
    """The samples of `split` ("train" | "test"), with tables and file existence checked."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(data_dir, "data folder not found")
    if not any(data_dir.iterdir()):
        raise InputError(data_dir, "data folder is empty (expected train/, test/ and the CSV files)")
    csv_path = data_dir / SPLIT_CSV[split]
    df = read_csv(csv_path, SPLIT_COLUMNS[split])
    if df.empty:
        raise InputError(csv_path, "lists no samples")
    meta = load_metadata(data_dir)
    folder = data_dir / split
    samples, seen = [], set()
    for row in df.itertuples(index=False):
        tile_id = row.id.strip()
        if tile_id in seen:
            raise InputError(csv_path, f"duplicate id '{tile_id}'")
        seen.add(tile_id)
        if tile_id not in meta:
            raise InputError(
                data_dir / METADATA_CSV, f"id '{tile_id}' (listed in {csv_path.name}) is missing"
            )
        city, gsd, group = meta[tile_id]
        files = {"rgb": row.rgb}
        if split == "train":
            files.update(agl=row.agl, vflow=row.json)
        paths = {key: _listed_file(folder, name, csv_path) for key, name in files.items()}
        samples.append(
            Sample(tile_id, city, gsd, split, paths["rgb"], paths.get("agl"), paths.get("vflow"), group)
        )
    return samples


def _listed_file(folder: Path, name: str, csv_path: Path) -> Path:
    name = name.strip()
    path = folder / name
    if not name or not path.is_file():
        raise InputError(path, f"file not found (listed in {csv_path.name})")
    return path


def validate_samples(samples: Iterable[Sample]) -> None:
    """Open every file cheaply; the first unreadable, mis-typed or mis-shaped one raises
    InputError naming it."""
    for s in samples:
        shape = io.probe_rgb(s.rgb)
        if s.agl is not None:
            agl_shape = io.probe_agl(s.agl)
            if agl_shape != shape:
                raise InputError(
                    s.agl, f"AGL shape {agl_shape} differs from its RGB's {shape} ({s.rgb.name})"
                )
        if s.vflow is not None:
            io.read_vflow(s.vflow)
