"""Test oracles: independent or convenience forms of product code that only the tests use.

- the closed-form vflow rules (docs/GEOPOSE.md, 'Geo-consistent augmentation'), a check on the general rule
  `functional.update_vflow` that the product uses;
- the single geo-consistent flips, transpose and rot90 (no augmentation preset uses them; `GeoD4`
  covers all eight symmetries), which check the vflow maths on one symmetry at a time;
- `SubmissionWriter`, which writes predictions into one folder and packs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np

from geopose_ray.data import functional as F
from geopose_ray.data.transforms import VflowMixin
from geopose_ray.submission import pack, write_prediction

# --- closed forms of the vflow rules ---------------------------------------------------------------


def rot90_vflow(vflow: np.ndarray, k: int) -> np.ndarray:
    """`np.rot90` k times: a + k*pi/2; scale and gsd unchanged."""
    return np.array([F.wrap_angle(vflow[0] + k * np.pi / 2), vflow[1], vflow[2]])


def hflip_vflow(vflow: np.ndarray) -> np.ndarray:
    """Horizontal flip: -a."""
    return np.array([F.wrap_angle(-vflow[0]), vflow[1], vflow[2]])


def vflip_vflow(vflow: np.ndarray) -> np.ndarray:
    """Vertical flip: pi - a."""
    return np.array([F.wrap_angle(np.pi - vflow[0]), vflow[1], vflow[2]])


def transpose_vflow(vflow: np.ndarray) -> np.ndarray:
    """Transpose: pi/2 - a."""
    return np.array([F.wrap_angle(np.pi / 2 - vflow[0]), vflow[1], vflow[2]])


def rotate_zoom_vflow(vflow: np.ndarray, rotate_deg: float, zoom: float) -> np.ndarray:
    """Affine rotate +phi degrees (counter-clockwise on screen) and zoom s (content magnified by s):
    a + phi, scale * s, gsd / s. The baseline and 2nd place had the zoom rule inverted."""
    return np.array([F.wrap_angle(vflow[0] + np.deg2rad(rotate_deg)), vflow[1] * zoom, vflow[2] / zoom])


# --- single geo-consistent symmetries --------------------------------------------------------------


class GeoHorizontalFlip(VflowMixin, A.HorizontalFlip):
    def vflow_linear(self, **params: Any) -> np.ndarray:
        return F.hflip_matrix()


class GeoVerticalFlip(VflowMixin, A.VerticalFlip):
    def vflow_linear(self, **params: Any) -> np.ndarray:
        return F.vflip_matrix()


class GeoTranspose(VflowMixin, A.Transpose):
    def vflow_linear(self, **params: Any) -> np.ndarray:
        return F.transpose_matrix()


class GeoRandomRotate90(VflowMixin, A.RandomRotate90):
    def vflow_linear(self, factor: int, **params: Any) -> np.ndarray:
        return F.rot90_matrix(factor)


# --- submission ------------------------------------------------------------------------------------


class SubmissionWriter:
    """Collects predictions in `out_dir` and packs them; remembers which tiles it wrote."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stems: list[str] = []

    def write(self, stem: str, agl_m: np.ndarray, scale_px_per_m: float, angle_rad: float) -> None:
        write_prediction(self.out_dir, stem, agl_m, scale_px_per_m, angle_rad)
        self.stems.append(stem)

    def pack(self, archive_path: str | Path | None = None) -> Path:
        return pack(self.out_dir, archive_path)
