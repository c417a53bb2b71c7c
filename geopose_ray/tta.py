"""Test-time augmentation: the D4 / flip views of a tile and their exact inverses.

A view is `x -> rot90(T^t(x), k)` (torch's k > 0 turns counter-clockwise on screen, as np.rot90).
AGL maps go back through the inverse spatial transform; a predicted direction row vector
d' = (x', y') goes back as d = d' @ M with the view's matrix from docs/GEOPOSE.md, 'D4 test-time augmentation' (x = column,
y = row down); scale does not change under D4. No `ray` import here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class View:
    name: str
    transpose: bool  # swap rows and columns first
    k: int  # then torch.rot90(k) over (H, W); k = 1 is counter-clockwise on screen
    matrix: tuple[tuple[float, float], tuple[float, float]]  # d = d' @ M (row vectors)


# docs/GEOPOSE.md, 'D4 test-time augmentation', in the order of pytorch-toolbelt's d4_image_augment.
D4_VIEWS: tuple[View, ...] = (
    View("identity", False, 0, ((1, 0), (0, 1))),
    View("rot90_cw", False, -1, ((0, -1), (1, 0))),
    View("rot180", False, 2, ((-1, 0), (0, -1))),
    View("rot90_ccw", False, 1, ((0, 1), (-1, 0))),
    View("transpose", True, 0, ((0, 1), (1, 0))),
    View("hflip", True, -1, ((-1, 0), (0, 1))),  # cw(T) == flip columns
    View("rot180_t", True, 2, ((0, -1), (-1, 0))),
    View("vflip", True, 1, ((1, 0), (0, -1))),  # ccw(T) == flip rows
)
_BY_NAME = {v.name: v for v in D4_VIEWS}
TTA_MODES: dict[str, tuple[View, ...]] = {
    "none": (_BY_NAME["identity"],),
    # 1st place's four passes: identity, h-flip, v-flip and both (== rot180), the D2 subgroup.
    "flip": tuple(_BY_NAME[n] for n in ("identity", "hflip", "vflip", "rot180")),
    "d4": D4_VIEWS,
}  # keys: constants.TTA_NAMES


def views_for(tta: str) -> tuple[View, ...]:
    """The views of a TTA mode; ValueError lists the valid names."""
    try:
        return TTA_MODES[tta]
    except KeyError:
        raise ValueError(f"unknown tta {tta!r}; expected one of {sorted(TTA_MODES)}") from None


def apply_view(x: torch.Tensor, view: View) -> torch.Tensor:
    """Spatial transform of (..., H, W) into the view's frame."""
    if view.transpose:
        x = x.transpose(-2, -1)
    return torch.rot90(x, view.k, dims=(-2, -1)) if view.k % 4 else x


def invert_view(y: torch.Tensor, view: View) -> torch.Tensor:
    """Inverse of `apply_view`: a map predicted in the view's frame back to the tile's frame."""
    if view.k % 4:
        y = torch.rot90(y, -view.k, dims=(-2, -1))
    return y.transpose(-2, -1) if view.transpose else y


def invert_direction(d: torch.Tensor, view: View) -> torch.Tensor:
    """(..., 2) predicted (sin, cos) in the view's frame -> L2-normalised, in the tile's frame."""
    d = torch.nn.functional.normalize(d.float(), dim=-1)
    m = torch.tensor(view.matrix, dtype=d.dtype, device=d.device)
    return d @ m


def shape_groups(views: tuple[View, ...], height: int, width: int) -> list[list[int]]:
    """Indices of views that share an output shape, so each group runs as one batch
    (all of D4 on a square tile; two groups when rot90 views of a non-square tile differ)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, v in enumerate(views):
        swapped = v.transpose != bool(v.k % 2)
        groups.setdefault((width, height) if swapped else (height, width), []).append(i)
    return list(groups.values())
