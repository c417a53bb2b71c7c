"""Geo-consistent albumentations 2.x transforms and the train-time presets built from them.

Every geometric transform here moves the image, the AGL label (an extra "mask" target, nearest
interpolation, NaN fill) and the per-sample `vflow = [angle rad, scale px/m, gsd m/px]` together;
the maths lives in `functional.py`. Usage (the dataset's call):

    t = build_train_transform("full", "light", p=0.5, rotate_limit=22, zoom_limit=0.1, seed=0)
    out = t(image=rgb_uint8_hwc, agl=agl_f32_hw, vflow=np.array([angle, scale, gsd]))

Randomness: one numpy Generator and one `random.Random` per Compose, shared by all its children
(see `reseed`). DataLoader workers inherit copies of that state, so each worker must call
`reseed(transform, seed)` with its own seed from `worker_init_fn`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import albumentations as A
import cv2
import numpy as np

from geopose_ray.data import functional as F

if TYPE_CHECKING:
    from geopose_ray.config import DataConfig

ADDITIONAL_TARGETS: dict[str, str] = {"agl": "mask"}  # (H, W) float32 metres, NaN = no data


class VflowMixin:
    """Adds a "vflow" target to an albumentations DualTransform.

    Mix it in first (`class GeoX(VflowMixin, A.X)`): the target function receives the same sampled
    params as the image, and `vflow_linear(**params)` names the 2x2 linear part of the warp.
    """

    @property
    def targets(self) -> dict[str, Callable[..., Any]]:
        return {**super().targets, "vflow": self.apply_to_vflow}  # type: ignore[misc]

    def apply_to_vflow(self, vflow: np.ndarray, **params: Any) -> np.ndarray:
        return F.update_vflow(vflow, self.vflow_linear(**params))

    def vflow_linear(self, **params: Any) -> np.ndarray:
        raise NotImplementedError


class GeoD4(VflowMixin, A.D4):
    """A random element of the 8-element dihedral group (square inputs keep their shape)."""

    def vflow_linear(self, group_element: str, **params: Any) -> np.ndarray:
        return F.d4_matrix(group_element)


class GeoAffine(VflowMixin, A.Affine):
    """A.Affine with label-safe defaults: NaN border and nearest interpolation for masks, equal x/y
    zoom. Never let labels fall back to `fill_mask=0` (a border of valid 0 m heights)."""

    def __init__(
        self,
        scale: tuple[float, float] | float = (1.0, 1.0),  # s > 1 magnifies content
        rotate: tuple[float, float] | float = 0.0,  # degrees, positive = counter-clockwise on screen
        translate_percent: tuple[float, float] | float | None = None,
        keep_ratio: bool = True,
        interpolation: int = cv2.INTER_LINEAR,  # image
        mask_interpolation: int = cv2.INTER_NEAREST,  # labels
        fill: float = 0,  # image border
        fill_mask: float = np.nan,  # label border
        p: float = 0.5,
    ):
        super().__init__(
            scale=scale,
            rotate=rotate,
            translate_percent=translate_percent,
            keep_ratio=keep_ratio,
            interpolation=interpolation,
            mask_interpolation=mask_interpolation,
            border_mode=cv2.BORDER_CONSTANT,
            fill=fill,
            fill_mask=fill_mask,
            p=p,
        )

    def vflow_linear(self, matrix: np.ndarray, **params: Any) -> np.ndarray:
        return F.affine_linear(matrix)


# --- presets ---------------------------------------------------------------------------------------


def _geo_none(p: float, rotate_limit: float, zoom_limit: float) -> list[A.BasicTransform]:
    return []


def _geo_d4(p: float, rotate_limit: float, zoom_limit: float) -> list[A.BasicTransform]:
    return [GeoD4(p=p)]


def _geo_affine(p: float, rotate_limit: float, zoom_limit: float) -> list[A.BasicTransform]:
    return [GeoAffine(rotate=(-rotate_limit, rotate_limit), scale=(1 - zoom_limit, 1 + zoom_limit), p=p)]


def _geo_full(p: float, rotate_limit: float, zoom_limit: float) -> list[A.BasicTransform]:
    return _geo_d4(p, rotate_limit, zoom_limit) + _geo_affine(p, rotate_limit, zoom_limit)


GEO_PRESETS: dict[str, Callable[[float, float, float], list[A.BasicTransform]]] = {
    "none": _geo_none,
    "d4": _geo_d4,
    "affine": _geo_affine,
    "full": _geo_full,
}


class PhotoLevel(NamedTuple):
    """Strengths of one photometric preset; 0 / None switches an op off. Image-only ops (and
    CoarseDropout with fill_mask=None) never touch agl or vflow."""

    brightness_contrast: float  # +- fraction
    gamma: int  # +- percent around 100
    clahe: float  # upper clip limit
    noise: tuple[float, float] | None  # GaussNoise std range, fraction of 255
    hsv: int  # saturation shift; hue and value shift half of it
    fog: tuple[float, float] | None  # RandomFog coefficient range
    holes: int  # at most this many CoarseDropout holes, 5-15 % of the side each


PHOTO_PRESETS: dict[str, PhotoLevel] = {
    "none": PhotoLevel(0.0, 0, 0.0, None, 0, None, 0),
    "light": PhotoLevel(0.1, 10, 0.0, None, 0, None, 0),
    "medium": PhotoLevel(0.2, 20, 2.0, (0.01, 0.03), 10, None, 0),
    "heavy": PhotoLevel(0.3, 30, 4.0, (0.02, 0.06), 20, (0.1, 0.3), 4),
}


def _photometric(level: PhotoLevel, p: float) -> list[A.BasicTransform]:
    """The ops a preset switches on, each applied with probability p."""
    ops: list[A.BasicTransform] = []
    if level.brightness_contrast:
        bc = level.brightness_contrast
        ops.append(A.RandomBrightnessContrast(brightness_limit=bc, contrast_limit=bc, p=p))
    if level.gamma:
        ops.append(A.RandomGamma(gamma_limit=(100 - level.gamma, 100 + level.gamma), p=p))
    if level.clahe:
        ops.append(A.CLAHE(clip_limit=(1.0, level.clahe), p=p))
    if level.noise:
        ops.append(A.GaussNoise(std_range=level.noise, p=p))
    if level.hsv:
        h = level.hsv
        ops.append(
            A.HueSaturationValue(hue_shift_limit=h // 2, sat_shift_limit=h, val_shift_limit=h // 2, p=p)
        )
    if level.fog:
        ops.append(A.RandomFog(fog_coef_range=level.fog, alpha_coef=0.08, p=p))
    if level.holes:
        ops.append(
            A.CoarseDropout(
                num_holes_range=(1, level.holes),
                hole_height_range=(0.05, 0.15),
                hole_width_range=(0.05, 0.15),
                fill=0,
                fill_mask=None,  # labels keep their values under the hole
                p=p,
            )
        )
    return ops


def _lookup(registry: dict[str, Any], name: str, kind: str) -> Any:
    if name not in registry:
        raise ValueError(f"unknown {kind} preset {name!r}; valid: {sorted(registry)}")
    return registry[name]


class SharedRngCompose(A.Compose):
    """A.Compose whose `set_random_seed` (the albumentations API a dataset may call) gives all
    children one shared generator pair, as `reseed` does."""

    def set_random_seed(self, seed: int | None) -> None:
        super().set_random_seed(seed)
        reseed(self, seed)


def reseed(transform: A.BaseCompose | A.BasicTransform, seed: int | None) -> None:
    """Give `transform` (and all its children) ONE fresh numpy + python generator pair.

    Why not `Compose(seed=)` / `set_random_seed`: albumentations 2.0.8 seeds every child with the
    same seed, so children with equal p fire in lockstep (HFlip and VFlip always together). A
    shared generator draws each child's numbers in turn. Call from `worker_init_fn`, e.g.
    `reseed(ds.transform, torch.initial_seed() % 2**32)` (differs per worker and per epoch).
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def build_train_transform(
    geo: str,
    photo: str,
    p: float,
    rotate_limit: float,
    zoom_limit: float,
    seed: int | None = None,
) -> SharedRngCompose:
    """Train-time Compose: geometric preset, then photometric preset.

    Call it as `t(image=(H, W, 3) uint8, agl=(H, W) float32 m, vflow=[angle, scale, gsd])`;
    extra mask targets (`mask=`) move with the geometry. `seed=None` draws fresh entropy.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"aug_prob must lie in [0, 1], got {p}")
    if rotate_limit < 0 or not 0.0 <= zoom_limit < 1.0:
        raise ValueError(f"need rotate_limit >= 0 and 0 <= zoom_limit < 1, got {rotate_limit}, {zoom_limit}")
    ops = _lookup(GEO_PRESETS, geo, "geometric")(p, rotate_limit, zoom_limit)
    ops += _photometric(_lookup(PHOTO_PRESETS, photo, "photometric"), p)
    # strict=False (the default) lets `vflow` pass untouched through ops that do not declare it.
    return SharedRngCompose(ops, additional_targets=dict(ADDITIONAL_TARGETS), strict=False, seed=seed)


def build_train_transform_from_config(cfg: DataConfig, seed: int | None = None) -> SharedRngCompose:
    """`build_train_transform` from the data section of a run config."""
    return build_train_transform(
        geo=cfg.geo_aug,
        photo=cfg.photo_aug,
        p=cfg.aug_prob,
        rotate_limit=cfg.rotate_limit,
        zoom_limit=cfg.zoom_limit,
        seed=seed,
    )
