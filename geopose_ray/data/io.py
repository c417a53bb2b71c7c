"""Read and write the challenge's files: RGB (.j2k / GeoTIFF), AGL (uint16 cm), VFLOW (json).

Every read turns a rasterio / json failure into `InputError(path, ...)` so a CLI shows one line
naming the bad file; every write goes through `atomic_path`, so no half-written file ever sits
under its final name. Units in memory follow ARCHITECTURE.md: AGL float32 metres with NaN,
scale px/m, angle radians.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.session import DummySession
from rasterio.windows import Window

from geopose_ray.atomic import atomic_path
from geopose_ray.constants import AGL_MAX_CM, AGL_NODATA, CM_PER_M
from geopose_ray.errors import InputError

TILE_BLOCK = 256  # px, block size of the cache's tiled GeoTIFFs (fast windowed reads)


@dataclass(frozen=True)
class VFlow:
    scale: float  # px/m
    angle: float  # rad, atan2(x, y): x = column (right), y = row (down)


def local_env() -> rasterio.Env:
    """A rasterio Env for local files: no cloud session, whatever the environment holds."""
    return rasterio.Env(session=DummySession())


@contextmanager
def open_raster(path: str | Path) -> Iterator[rasterio.DatasetReader]:
    """Open for reading; missing / unreadable / corrupt file -> InputError naming it.

    The file is local, so the open and every read run in a rasterio Env with no cloud session.
    Without one, rasterio builds an Env per call, and with AWS credentials in the environment
    (a cluster that writes to `--storage s3://`) each builds a boto3 session for every read,
    which slows every epoch down (the cost:
    docs/BENCHMARKS.md, 'Figures moved from code comments')."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    with warnings.catch_warnings(), local_env():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            ds = rasterio.open(path)
        except (RasterioError, OSError) as e:
            raise InputError(path, f"cannot open raster ({_short(e)})") from None
        with ds:
            yield ds


def read_window(ds: rasterio.DatasetReader, path: str | Path, window: Window | None) -> np.ndarray:
    """All bands of `window` (None = whole image) as (C, H, W); decode errors -> InputError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            return ds.read(window=window)
        except (RasterioError, OSError) as e:
            raise InputError(path, f"cannot decode raster, truncated or corrupt? ({_short(e)})") from None


def check_rgb(ds: rasterio.DatasetReader, path: str | Path) -> None:
    if ds.count != 3 or any(dt != "uint8" for dt in ds.dtypes):
        raise InputError(path, f"expected 3 uint8 bands, got {ds.count} band(s) {ds.dtypes[0]}")


def check_agl(ds: rasterio.DatasetReader, path: str | Path) -> None:
    if ds.count != 1 or ds.dtypes[0] != "uint16":
        raise InputError(path, f"expected 1 uint16 band (cm), got {ds.count} band(s) {ds.dtypes[0]}")


def read_rgb(path: str | Path, window: Window | None = None) -> np.ndarray:
    """(H, W, 3) uint8 from a .j2k or GeoTIFF; `window` reads only that part."""
    with open_raster(path) as ds:
        check_rgb(ds, path)
        chw = read_window(ds, path, window)
    return np.ascontiguousarray(chw.transpose(1, 2, 0))


def agl_cm_to_m(agl_cm: np.ndarray) -> np.ndarray:
    """uint16 cm (65535 = no data) -> float32 metres with NaN."""
    out = agl_cm.astype(np.float32) / np.float32(CM_PER_M)
    out[agl_cm == AGL_NODATA] = np.nan
    return out


def read_agl(path: str | Path, window: Window | None = None) -> np.ndarray:
    """(H, W) float32 metres, NaN where the file holds 65535 (no lidar return)."""
    with open_raster(path) as ds:
        check_agl(ds, path)
        cm = read_window(ds, path, window)[0]
    return agl_cm_to_m(cm)


def read_agl_cm(path: str | Path, window: Window | None = None) -> np.ndarray:
    """(H, W) uint16 centimetres as stored (conversion copies these bit-exact)."""
    with open_raster(path) as ds:
        check_agl(ds, path)
        return read_window(ds, path, window)[0]


def read_vflow(path: str | Path) -> VFlow:
    """VFLOW json {"scale": px/cm, "angle": rad} -> VFlow(scale px/m, angle rad)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"cannot parse JSON ({_short(e)})") from None
    if not isinstance(doc, dict):
        raise InputError(path, "expected a JSON object with 'scale' and 'angle'")
    scale = _finite(doc, "scale", path)
    angle = _finite(doc, "angle", path)
    return VFlow(scale=scale * CM_PER_M, angle=angle)


def _finite(doc: dict[str, Any], key: str, path: Path) -> float:
    if key not in doc:
        raise InputError(path, f"missing key '{key}'")
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(path, f"'{key}' is not a number: {value!r}")
    if not math.isfinite(value):
        raise InputError(path, f"'{key}' is not finite: {value!r}")
    return float(value)


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__


def _write(path: str | Path, array_chw: np.ndarray, **profile: Any) -> None:
    """Atomic rasterio write of a (C, H, W) array; GDAL picks no driver by suffix, we name it."""
    c, h, w = array_chw.shape
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with (
            local_env(),
            rasterio.open(tmp, "w", width=w, height=h, count=c, dtype=array_chw.dtype, **profile) as ds,
        ):
            ds.write(array_chw)


def write_rgb_j2k(path: str | Path, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 -> lossless JPEG 2000 codestream (the challenge's RGB format)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    _write(path, rgb.transpose(2, 0, 1), driver="JP2OpenJPEG", CODEC="J2K", REVERSIBLE="YES", QUALITY="100")


def agl_m_to_cm(agl_m: np.ndarray) -> np.ndarray:
    """float metres (NaN = no data) -> uint16 cm: round, clip to [0, 65534], NaN -> 65535."""
    agl_m = np.asarray(agl_m, dtype=np.float64)
    cm = np.clip(np.rint(np.nan_to_num(agl_m * CM_PER_M, nan=0.0)), 0, AGL_MAX_CM).astype(np.uint16)
    cm[~np.isfinite(agl_m)] = AGL_NODATA
    return cm


def write_agl_cm(path: str | Path, agl_m: np.ndarray) -> None:
    """(H, W) metres -> deflate GeoTIFF of uint16 cm with nodata 65535 (the challenge's AGL format)."""
    cm = agl_m_to_cm(agl_m)
    _write(path, cm[None], driver="GTiff", compress="deflate", nodata=AGL_NODATA)


def write_vflow(path: str | Path, vflow: VFlow) -> None:
    """VFlow(px/m, rad) -> json {"scale": px/cm, "angle": rad}."""
    doc = {"scale": float(vflow.scale) / CM_PER_M, "angle": float(vflow.angle)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc))


def _tiled_profile(compress: str | None) -> dict[str, Any]:
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "tiled": True,
        "blockxsize": TILE_BLOCK,
        "blockysize": TILE_BLOCK,
    }
    if compress and compress != "none":
        profile["compress"] = compress
    return profile


def write_rgb_tiled(path: str | Path, rgb: np.ndarray, compress: str | None = None) -> None:
    """(H, W, 3) uint8 -> tiled GeoTIFF (256 px blocks): windowed crops decode only their blocks."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    _write(path, rgb.transpose(2, 0, 1), interleave="pixel", **_tiled_profile(compress))


def write_agl_tiled(path: str | Path, agl_cm: np.ndarray, compress: str | None = None) -> None:
    """(H, W) uint16 cm (65535 = no data) -> tiled GeoTIFF for the cache."""
    agl_cm = np.asarray(agl_cm)
    if agl_cm.dtype != np.uint16:
        raise TypeError(f"write_agl_tiled wants uint16 cm, got {agl_cm.dtype}")
    _write(path, agl_cm[None], nodata=AGL_NODATA, **_tiled_profile(compress))


def probe_rgb(path: str | Path) -> tuple[int, int]:
    """Cheap full check of an RGB file: header, 3 uint8 bands, and a decode that fails on a
    truncated file; returns (H, W). Checks every file up front for a fraction of a full decode
    (docs/BENCHMARKS.md, 'Figures moved from code comments')."""
    with open_raster(path) as ds:
        check_rgb(ds, path)
        _probe_decode(ds, path)
        return ds.height, ds.width


def probe_agl(path: str | Path) -> tuple[int, int]:
    """Cheap full check of an AGL file (header, 1 uint16 band, last block readable); (H, W)."""
    with open_raster(path) as ds:
        check_agl(ds, path)
        _probe_decode(ds, path)
        return ds.height, ds.width


def _probe_decode(ds: rasterio.DatasetReader, path: str | Path) -> None:
    """A header can be intact while the data is cut short: GeoTIFF keeps its last block at the
    end of the file, so read the last row; JPEG 2000 decodes in strict mode, where even the
    smallest resolution level fails on a truncated codestream."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            factors = ds.overviews(1)
            if ds.driver == "GTiff" or not factors:
                ds.read(window=Window(0, ds.height - 1, ds.width, 1))
            else:
                shape = (ds.count, max(1, ds.height // factors[-1]), max(1, ds.width // factors[-1]))
                ds.read(out_shape=shape)
        except (RasterioError, OSError) as e:
            raise InputError(path, f"truncated or corrupt raster ({_short(e)})") from None
