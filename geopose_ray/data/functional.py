"""Pure maths of geo-consistent augmentation: how angle, scale and GSD follow an image warp.

Conventions (docs/GEOPOSE.md, 'Vector flow'): x = column (right), y = row (down); the flow direction is
`(sin a, cos a)` and `a = atan2(x, y)`. A per-sample `vflow` vector is
`[angle rad, scale px/m, gsd m/px]`. Every warp of the image plane with 2x2 linear part `M`
(acting on `(x, y)` column vectors, source -> destination) maps a displacement `d` to `M @ d`, so
one general rule (`update_vflow`) covers flips, rot90, transpose, D4 and Affine; the closed forms
of the same rules, an independent check, live with the tests (`tests/oracles.py`).
"""

from __future__ import annotations

import numpy as np

TWO_PI = 2.0 * np.pi
D4_ELEMENTS: tuple[str, ...] = ("e", "r90", "r180", "r270", "v", "hvt", "h", "t")  # albumentations names


def wrap_angle(angle: float) -> float:
    """Angle in [0, 2*pi) (only sin/cos matter, but one branch keeps logs and tests readable)."""
    wrapped = float(np.mod(angle, TWO_PI))
    return 0.0 if wrapped >= TWO_PI else wrapped  # np.mod(-1e-17, 2*pi) rounds to 2*pi


def direction(angle: float) -> np.ndarray:
    """Unit flow direction `(sin a, cos a)` in (x, y) image coordinates, shape (2,)."""
    return np.array([np.sin(angle), np.cos(angle)])


def angle_of(vec: np.ndarray) -> float:
    """Inverse of `direction` for any non-zero (x, y) vector: `atan2(x, y)` wrapped to [0, 2*pi)."""
    return wrap_angle(np.arctan2(vec[0], vec[1]))


def update_vflow(vflow: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """New `[angle, scale, gsd]` after a warp whose linear part is `linear` (2x2, on (x, y)).

    A height of h metres is drawn as the displacement `h * scale * (sin a, cos a)` px; the warp maps
    it to `M @` that, hence the new direction and a length factor `|M @ dir|`. Ground distances
    shrink by sqrt|det M| pixels per pixel, so gsd (m/px) is divided by it.
    """
    vflow = np.asarray(vflow, dtype=np.float64)
    linear = np.asarray(linear, dtype=np.float64)
    if vflow.shape != (3,) or linear.shape != (2, 2):
        raise ValueError(f"expected vflow (3,) and linear (2, 2), got {vflow.shape} and {linear.shape}")
    w = linear @ direction(vflow[0])  # (2,) px per px of old displacement
    det = abs(float(np.linalg.det(linear)))
    if det == 0.0:
        raise ValueError("singular warp: a degenerate linear part cannot carry the flow")
    return np.array([angle_of(w), vflow[1] * float(np.linalg.norm(w)), vflow[2] / np.sqrt(det)])


# --- 2x2 linear parts of the lossless symmetries, on (x, y) ---------------------------------------


def rot90_matrix(k: int) -> np.ndarray:
    """Linear part of `np.rot90(img, k)` (counter-clockwise on screen): pixel (x, y) -> (y, -x)."""
    one = np.array([[0.0, 1.0], [-1.0, 0.0]])
    return np.linalg.matrix_power(one, int(k) % 4)


def hflip_matrix() -> np.ndarray:
    """Columns reversed (`img[:, ::-1]`): x -> -x."""
    return np.diag([-1.0, 1.0])


def vflip_matrix() -> np.ndarray:
    """Rows reversed (`img[::-1]`): y -> -y."""
    return np.diag([1.0, -1.0])


def transpose_matrix() -> np.ndarray:
    """Rows and columns swapped: (x, y) -> (y, x)."""
    return np.array([[0.0, 1.0], [1.0, 0.0]])


def d4_matrix(element: str) -> np.ndarray:
    """Linear part of albumentations' `d4(img, element)` for its eight group-element names."""
    table = {
        "e": np.eye(2),
        "r90": rot90_matrix(1),
        "r180": rot90_matrix(2),
        "r270": rot90_matrix(3),
        "v": vflip_matrix(),
        "h": hflip_matrix(),
        "t": transpose_matrix(),
        "hvt": transpose_matrix() @ rot90_matrix(2),  # albumentations: transpose(rot90(x, 2))
    }
    if element not in table:
        raise ValueError(f"unknown D4 element {element!r}; valid: {list(D4_ELEMENTS)}")
    return table[element]


def affine_linear(matrix: np.ndarray) -> np.ndarray:
    """2x2 linear part of a 3x3 (or 2x3) pixel-space affine matrix (source -> destination)."""
    return np.asarray(matrix, dtype=np.float64)[:2, :2]

