"""Write, pack and check a challenge submission (docs/GEOPOSE.md, 'Submission').

A submission is one `{CITY}_{id}_AGL.tif` (uint16 cm, deflate, one band, the RGB's size) and one
`{CITY}_{id}_VFLOW.json` ({"scale": px/cm, "angle": rad}) per test tile, all at the root of
`submission_compressed.tar.gz`. The checker refuses what would make the official scorer crash or
zero a city (a missing file, a wrong shape or dtype, a NaN in a json) before it costs a submission.

    python -m geopose_ray.submission check ARCHIVE --data DIR   # exit 0 valid, 1 problems, 2 bad input
    python -m geopose_ray.submission pack PRED_DIR [--out ARCHIVE]
    (the command: `submission/__main__.py`)
"""

from __future__ import annotations

import contextlib
import csv
import math
import tarfile
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geopose_ray.atomic import atomic_path
from geopose_ray.constants import AGL_NODATA, SUBMISSION_ARCHIVE
from geopose_ray.data import io
from geopose_ray.errors import InputError

AGL_SUFFIX = "_AGL.tif"
VFLOW_SUFFIX = "_VFLOW.json"
RGB_SUFFIX = "_RGB.j2k"


# --- writing ----------------------------------------------------------------------------
def prediction_paths(out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """(AGL tif, VFLOW json) paths of tile `stem` ("{CITY}_{id}")."""
    out_dir = Path(out_dir)
    return out_dir / f"{stem}{AGL_SUFFIX}", out_dir / f"{stem}{VFLOW_SUFFIX}"


def write_prediction(
    out_dir: str | Path, stem: str, agl_m: np.ndarray, scale_px_per_m: float, angle_rad: float
) -> tuple[Path, Path]:
    """Write one tile's prediction atomically; agl_m (H, W) metres at the RGB's full size.

    A non-finite value is refused rather than written: a NaN AGL pixel would become 65535
    (no data) and a NaN scale or angle zeroes the whole city in the official scorer.
    """
    agl_m = np.asarray(agl_m)
    if agl_m.ndim != 2:
        raise ValueError(f"{stem}: agl_m must be (H, W), got shape {agl_m.shape}")
    if not np.isfinite(agl_m).all():
        raise ValueError(f"{stem}: AGL prediction has non-finite values")
    if not (math.isfinite(scale_px_per_m) and math.isfinite(angle_rad)):
        raise ValueError(f"{stem}: scale/angle must be finite, got {scale_px_per_m}, {angle_rad}")
    agl_path, vflow_path = prediction_paths(out_dir, stem)
    io.write_agl_cm(agl_path, agl_m)  # rounds to cm, clips to [0, 65534], deflate
    io.write_vflow(vflow_path, io.VFlow(scale=float(scale_px_per_m), angle=float(angle_rad)))
    return agl_path, vflow_path


def _prediction_files(folder: Path) -> list[Path]:
    """The folder's prediction files (no temporaries of interrupted writes), sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith((AGL_SUFFIX, VFLOW_SUFFIX))
    )


def pack(out_dir: str | Path, archive_path: str | Path | None = None) -> Path:
    """Tar+gzip every prediction file of `out_dir` at the archive root (arcname = file name).

    Default archive: `out_dir/submission_compressed.tar.gz`. Written under a temporary name and
    renamed, so an interrupted pack never leaves a truncated archive that looks finished.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(out_dir, "prediction folder not found")
    files = _prediction_files(out_dir)
    if not files:
        raise InputError(out_dir, f"no *{AGL_SUFFIX} / *{VFLOW_SUFFIX} files to pack")
    archive = Path(archive_path) if archive_path else out_dir / SUBMISSION_ARCHIVE
    with atomic_path(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    return archive


# --- reading an archive safely ----------------------------------------------------------
@contextlib.contextmanager
def opened_predictions(path: str | Path) -> Iterator[Path]:
    """Yield a folder holding the predictions: `path` itself, or a .tar.gz extracted to a temp dir.

    Absolute member names and `..` are refused outright; tarfile's "data" filter also refuses
    links leaving the folder and device files, so an archive cannot write outside the temp dir.
    """
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise InputError(path, "predictions not found (a folder or a .tar.gz)")
    with tempfile.TemporaryDirectory(prefix="geopose-sub-") as tmp:
        try:
            with tarfile.open(path, "r:*") as tar:
                for m in tar.getmembers():
                    if m.name.startswith(("/", "\\")) or ".." in Path(m.name).parts:
                        raise tarfile.FilterError(f"{m.name!r} points outside the archive")
                tar.extractall(tmp, filter="data")
        except tarfile.FilterError as e:
            raise InputError(path, f"refusing unsafe archive member ({e})") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InputError(path, f"cannot read archive ({e.__class__.__name__}: {e})") from None
        yield Path(tmp)


# --- checking ---------------------------------------------------------------------------
@dataclass
class CheckReport:
    n_tiles: int = 0  # test tiles expected
    problems: list[str] = field(default_factory=list)  # each makes the submission invalid
    warnings: list[str] = field(default_factory=list)  # worth reading, not fatal


def expected_tiles(data_dir: str | Path) -> list[tuple[str, Path]]:
    """(stem, RGB path) of every test tile listed in `data_dir/geopose_test.csv`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(data_dir, "data folder not found")
    table = data_dir / "geopose_test.csv"
    try:
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InputError(table, f"cannot read test list ({e.__class__.__name__})") from None
    if not rows or "rgb" not in rows[0]:
        raise InputError(table, "expected a CSV with an 'rgb' column and at least one row")
    tiles = []
    for row in rows:
        name = Path(row["rgb"]).name
        if not name.endswith(RGB_SUFFIX):
            raise InputError(table, f"rgb name {name!r} does not end with {RGB_SUFFIX}")
        tiles.append((name[: -len(RGB_SUFFIX)], data_dir / "test" / name))
    return tiles


def _rgb_shape(rgb_path: Path) -> tuple[int, int]:
    """(H, W) from the header only (a full j2k decode would take about a second)."""
    with io.open_raster(rgb_path) as ds:
        return ds.height, ds.width


def _check_agl(path: Path, shape: tuple[int, int], problems: list[str], warnings: list[str]) -> None:
    name = path.name
    try:
        with io.open_raster(path) as ds:
            if ds.count != 1 or ds.dtypes[0] != "uint16":
                problems.append(f"{name}: expected 1 uint16 band, got {ds.count} band(s) {ds.dtypes[0]}")
                return
            if (ds.height, ds.width) != shape:
                problems.append(f"{name}: shape {(ds.height, ds.width)} != its RGB's {shape}")
                return
            cm = io.read_window(ds, path, None)[0]  # decodes: a truncated file fails here
    except InputError as e:
        problems.append(f"{name}: {e.problem}")
        return
    if (cm == AGL_NODATA).any():
        warnings.append(f"{name}: holds {AGL_NODATA} (no data), those pixels drop out of the score")


def _check_vflow(path: Path, problems: list[str]) -> None:
    try:
        io.read_vflow(path)  # finite numeric scale and angle, or InputError
    except InputError as e:
        problems.append(f"{path.name}: {e.problem}")


def _check_tile(folder: Path, stem: str, rgb: Path) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    agl, vflow = prediction_paths(folder, stem)
    for p in (agl, vflow):
        if not p.is_file():
            problems.append(f"{p.name}: missing from the submission")
    if agl.is_file():
        _check_agl(agl, _rgb_shape(rgb), problems, warnings)
    if vflow.is_file():
        _check_vflow(vflow, problems)
    return problems, warnings


def inspect_submission(archive: str | Path, data_dir: str | Path, workers: int = 4) -> CheckReport:
    """Full check report of a submission archive (or folder) against the test list."""
    tiles = expected_tiles(data_dir)
    report = CheckReport(n_tiles=len(tiles))
    with opened_predictions(archive) as folder:
        with ThreadPoolExecutor(max(1, workers)) as pool:  # rasterio decodes without the GIL
            results = list(pool.map(lambda t: _check_tile(folder, *t), tiles))
        for problems, warnings in results:
            report.problems += problems
            report.warnings += warnings
        expected = {n for stem, _ in tiles for n in (stem + AGL_SUFFIX, stem + VFLOW_SUFFIX)}
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if rel not in expected and not p.is_dir():
                report.warnings.append(f"{rel}: extra file, not a test tile (the scorer ignores it)")
    return report


def check_submission(archive: str | Path, data_dir: str | Path) -> list[str]:
    """Problems that make the submission invalid (empty list = valid); warnings are dropped."""
    return inspect_submission(archive, data_dir).problems
