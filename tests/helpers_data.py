"""Shared "break the data set this way" helpers for the bad-input tests of every command.

`BAD_INPUTS[case](data_dir)` damages a valid DrivenData layout (see `test_layout.make_layout`)
in one way and returns the file or folder that the command's one-line error must name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from geopose_ray.data import layout


def first(data: Path, split: str = "train") -> layout.Sample:
    return layout.load_split(data, split)[0]


def edit_csv(path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    edit(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)
    return path


def write_raster(path: Path, array: np.ndarray) -> Path:
    """A plain GeoTIFF of a (C, H, W) array under `path`, whatever its suffix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        profile = {"driver": "GTiff", "width": array.shape[-1], "height": array.shape[-2]}
        with rasterio.open(path, "w", count=array.shape[0], dtype=array.dtype, **profile) as ds:
            ds.write(array)
    return path


def rm(path: Path) -> Path:
    path.unlink()
    return path


def garbage_header(path: Path) -> Path:
    path.write_bytes(bytes(64) + path.read_bytes()[64:])
    return path


def truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def empty(data: Path) -> Path:
    for p in sorted(data.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    return data


def rm_tree(data: Path) -> Path:
    empty(data).rmdir()
    return data


# each case damages a valid layout and returns the file the error line must name
BAD_INPUTS: dict[str, Callable[[Path], Path]] = {
    "missing_rgb": lambda d: rm(first(d).rgb),
    "missing_test_rgb": lambda d: rm(first(d, "test").rgb),
    "missing_agl": lambda d: rm(first(d).agl),
    "corrupt_j2k": lambda d: garbage_header(first(d, "test").rgb),
    "truncated_j2k": lambda d: truncate(first(d).rgb),
    "truncated_tif": lambda d: truncate(first(d).agl),
    "agl_shape": lambda d: write_raster(first(d).agl, np.zeros((1, 32, 64), np.uint16)),
    "agl_wrong_dtype": lambda d: write_raster(first(d).agl, np.zeros((1, 64, 64), np.float32)),
    "rgb_wrong_dtype": lambda d: write_raster(first(d).rgb, np.zeros((3, 64, 64), np.uint16)),
    "vflow_nan": lambda d: write_text(first(d).vflow, '{"scale": NaN, "angle": 0.5}'),
    "vflow_missing_key": lambda d: write_text(first(d).vflow, '{"angle": 0.5}'),
    "id_missing_from_metadata": lambda d: edit_csv(d / "metadata.csv", lambda m: m[m["id"] != first(d).id]),
    "unknown_city": lambda d: edit_csv(d / "metadata.csv", lambda m: m.assign(city=["XYZ", *m["city"][1:]])),
    "nan_gsd": lambda d: edit_csv(d / "metadata.csv", lambda m: m.assign(gsd=["nan", *m["gsd"][1:]])),
    "duplicate_id": lambda d: edit_csv(d / "geopose_train.csv", lambda t: pd.concat([t, t.iloc[[1]]])),
    "missing_metadata": lambda d: rm(d / "metadata.csv"),
    "empty_data_folder": empty,
    "missing_data_folder": rm_tree,
}
