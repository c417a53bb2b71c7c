"""Measured parallax of a written set: how far roofs move, as a share of the tile.

The figures a model has to cope with are read back from the files (AGL x VFLOW scale), not
taken from the style tables, so docs and tests describe what was actually written.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from geopose_ray.data.io import read_agl, read_vflow

RAISED_M = 2.0  # m: "above ground" for the share of raised pixels


def displacement_stats(data_dir: str | Path, max_tiles: int | None = None) -> dict[str, float]:
    """Over every labelled pixel of the set (train and test truth): the 95th percentile and the
    maximum of AGL * scale / tile size (fractions of the tile), and the share above RAISED_M.

    `max_tiles` reads only that many tiles, spread evenly over the set (quick looks at big sets)."""
    root = Path(data_dir)
    labels = [root / "train" / stem for stem in _stems(root / "geopose_train.csv", "agl")]
    labels += [root / "truth" / stem for stem in _stems(root / "geopose_test.csv", "rgb")]
    if max_tiles is not None and len(labels) > max_tiles:
        labels = [labels[i] for i in np.linspace(0, len(labels) - 1, max_tiles).round().astype(int)]
    if not labels:
        raise ValueError(f"{root}: no labelled tiles")
    shifts, raised, n_px = [], 0, 0
    for stem in labels:
        agl = read_agl(stem.with_name(f"{stem.name}_AGL.tif"))
        scale = read_vflow(stem.with_name(f"{stem.name}_VFLOW.json")).scale  # px/m
        valid = agl[np.isfinite(agl)]
        shifts.append(valid * scale / agl.shape[0])
        raised, n_px = raised + int((valid > RAISED_M).sum()), n_px + valid.size
    shift = np.concatenate(shifts)
    return {
        "p95": float(np.percentile(shift, 95)),
        "max": float(shift.max()),
        "raised_frac": raised / n_px,
        "tiles": len(labels),
    }


def _stems(table: Path, column: str) -> list[str]:
    """`CITY_id` of each row, from the file named in `column` (no table: no tiles)."""
    if not table.is_file():
        return []
    with open(table, newline="") as f:
        return [row[column].rsplit("_", 1)[0] for row in csv.DictReader(f)]
