"""Torch dataset over the conversion cache: random (or centre) crops read as rasterio windows.

Reading a window from the cache's 256 px tiled GeoTIFFs decodes only the blocks it touches, so
a crop costs a small part of a full decode (the figures: docs/BENCHMARKS.md, 'Where the time
goes (from the figures above)').

Randomness: crops use the dataset's own numpy Generator. DataLoader workers are forked copies of
the dataset, so without reseeding they would all draw the same crops and augmentations (the
baseline's bug, docs/GEOPOSE.md, 'Pitfalls'): pass `worker_init_fn` to the DataLoader.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset, default_collate, get_worker_info

from geopose_ray.constants import city_index
from geopose_ray.data import io, stats, transforms
from geopose_ray.data.cache import CachedSample, agl_sums
from geopose_ray.data.stats import BUILT_M

Transform = Callable[..., dict[str, Any]]
MIN_UNIT = 0.1  # m or px: the smallest output unit (a set of flat tiles)


class GeoposeDataset(Dataset):
    """Items: image (3, H, W) float32 [0, 1]; agl (1, H, W) m NaN; mag (1, H, W) px NaN;
    scale () px/m; direction (2,) (sin a, cos a); gsd () m/px; city () int64; id str.

    crop: training crop in px (None, or >= the tile size: the full tile). `length` > 0 fixes the
    items of one pass (sample i % n), so an epoch is a number of crops whatever the tile count.
    random_crop=False
    takes the centre crop instead (fast validation on big tiles). `foreground` is the share of
    random crops centred on a built pixel (AGL > `stats.BUILT_M`) instead of drawn uniformly:
    in a sparse city most uniform crops show flat ground only, which teaches the AGL that ground
    is flat and the flow head nothing (nnU-Net forces a third of its patches onto foreground for
    the same reason). `transform(image=, agl=, vflow=np.array([angle, scale, gsd]))` returns the
    same keys; mag is computed after it.
    """

    def __init__(
        self,
        samples: Sequence[CachedSample],
        crop: int | None,
        transform: Transform | None = None,
        repeat: int = 1,
        seed: int = 0,
        random_crop: bool = True,
        length: int = 0,
        foreground: float = 0.0,
    ):
        if not samples:
            raise ValueError("GeoposeDataset needs at least one sample")
        self.samples = list(samples)
        self.crop = crop
        self.transform = transform
        self.repeat = max(1, int(repeat))
        self.seed = seed
        self.random_crop = random_crop
        self.length = int(length)  # > 0: items per pass, cycling the samples (overrides repeat)
        self.foreground = float(foreground)
        self.rng = np.random.default_rng(seed)
        self._built: dict[str, np.ndarray] = {}  # sample id -> (K, 2) rows, cols of built pixels

    def __len__(self) -> int:
        return self.length if self.length > 0 else len(self.samples) * self.repeat

    def reseed(self, seed: int) -> None:
        """New crop (and augmentation, if the transform can be seeded) stream."""
        self.rng = np.random.default_rng(seed)
        if hasattr(self.transform, "set_random_state"):  # albumentations
            transforms.reseed(self.transform, seed)  # one shared stream, not children in lockstep

    def window(self, height: int, width: int, sample: CachedSample | None = None) -> Window:
        """The crop window of a (height, width) tile; centred on one of `sample`'s built pixels
        with probability `foreground` (where it has any), uniform otherwise."""
        ch = height if self.crop is None else min(self.crop, height)
        cw = width if self.crop is None else min(self.crop, width)
        if not self.random_crop:
            return Window((width - cw) // 2, (height - ch) // 2, cw, ch)
        built = self.built_pixels(sample) if sample is not None and self.foreground > 0 else None
        if built is not None and len(built) and self.rng.random() < self.foreground:
            r, c = built[int(self.rng.integers(len(built)))]
            row, col = min(max(0, r - ch // 2), height - ch), min(max(0, c - cw // 2), width - cw)
        else:
            row = int(self.rng.integers(0, height - ch + 1))
            col = int(self.rng.integers(0, width - cw + 1))
        return Window(int(col), int(row), cw, ch)

    def built_pixels(self, sample: CachedSample) -> np.ndarray:
        """(K, 2) int rows, cols of the tile's built pixels on a grid of at most 128 x 128 (a
        crop centre needs no finer aim), read once per process and kept."""
        if sample.agl is None:
            return np.zeros((0, 2), dtype=np.int64)
        if sample.id not in self._built:
            agl = io.read_agl(sample.agl)  # (H, W) m NaN
            step = max(1, -(-max(agl.shape) // 128))
            rows, cols = np.nonzero(np.nan_to_num(agl[::step, ::step], nan=0.0) > BUILT_M)
            self._built[sample.id] = np.stack([rows * step, cols * step], axis=1)
        return self._built[sample.id]

    def read(self, sample: CachedSample) -> tuple[np.ndarray, np.ndarray]:
        """(h, w, 3) uint8 RGB and (h, w) float32 m AGL of one crop (AGL all NaN for test tiles)."""
        with io.open_raster(sample.rgb) as ds:
            io.check_rgb(ds, sample.rgb)
            window = self.window(ds.height, ds.width, sample)
            rgb = io.read_window(ds, sample.rgb, window).transpose(1, 2, 0)
        if sample.agl is None:
            agl = np.full(rgb.shape[:2], np.nan, dtype=np.float32)
        else:
            agl = io.read_agl(sample.agl, window)
        return np.ascontiguousarray(rgb), agl

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index % len(self.samples)]
        rgb, agl = self.read(sample)  # (h, w, 3) uint8, (h, w) m
        vflow = np.array([sample.angle, sample.scale, sample.gsd], dtype=np.float64)
        if self.transform is not None:
            out = self.transform(image=rgb, agl=agl, vflow=vflow)
            rgb, agl, vflow = out["image"], out["agl"], np.asarray(out["vflow"], dtype=np.float64)
        angle, scale, gsd = (float(v) for v in vflow)
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        agl_t = torch.from_numpy(np.ascontiguousarray(agl, dtype=np.float32))[None]  # (1, h, w) m
        return {
            "image": image,  # (3, h, w) [0, 1]
            "agl": agl_t,
            "mag": agl_t * scale,  # (1, h, w) px
            "scale": torch.tensor(scale, dtype=torch.float32),  # px/m
            "direction": torch.tensor([math.sin(angle), math.cos(angle)], dtype=torch.float32),
            "gsd": torch.tensor(gsd, dtype=torch.float32),  # m/px
            "city": torch.tensor(city_index(sample.city), dtype=torch.int64),
            "id": sample.id,
        }


HALF_TURN_NEGATES = ("direction",)  # (sin a, cos a) -> (-sin a, -cos a) under a 180 deg turn
HALF_TURN_MAPS = ("image", "agl", "mag")  # (B, C, H, W) planes: flip rows and columns


def half_turn_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate the crops, then append each crop turned by 180 degrees: a batch of 2 x len(items).

    Why: in every batch the true flow directions then sum to zero, so a flow head cannot lower
    its loss by following the direction of the last few batches with a constant output (its
    bias); the pair's only common answer is the one read from the pixels. On tall, sparse
    cities that constant is what a single view predicted, and what D4 TTA averaged away
    (docs/LEARNING.md, 'Half turns'). Scale, GSD and city do not change.
    """
    batch = default_collate(items)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in HALF_TURN_MAPS:
            turned = value.flip(-2, -1)
        elif key in HALF_TURN_NEGATES:
            turned = -value
        else:
            turned = value
        out[key] = torch.cat([value, turned]) if torch.is_tensor(value) else [*value, *turned]
    out["half_turned"] = True  # the losses' marker: crops i and i + n are one crop's two views
    return out


def worker_init_fn(worker_id: int) -> None:
    """DataLoader hook: give each worker its own stream. torch.initial_seed() differs per worker
    and per epoch (the loader draws a new base seed each epoch) and follows torch.manual_seed."""
    info = get_worker_info()
    seed = torch.initial_seed() % 2**63
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if info is None:
        return
    for ds in _datasets(info.dataset):
        ds.reseed(int(np.random.SeedSequence([ds.seed % 2**63, seed]).generate_state(1)[0]))


def _datasets(ds: Any) -> list[GeoposeDataset]:
    """GeoposeDatasets inside Subset / ConcatDataset wrappers."""
    if isinstance(ds, GeoposeDataset):
        return [ds]
    inner = getattr(ds, "datasets", None) or ([ds.dataset] if hasattr(ds, "dataset") else [])
    return [d for x in inner for d in _datasets(x)]


def target_stats(sample: CachedSample) -> tuple[int, float, float]:
    """(valid AGL pixels, their sum m, sum of squares m^2) of a training tile: the sums that
    conversion stored in samples.csv, or (a cache written before them) read from the tile."""
    if math.isfinite(sample.agl_sum) and math.isfinite(sample.agl_sq):
        return sample.agl_n, sample.agl_sum, sample.agl_sq
    sums = agl_sums(sample.agl)
    return sums["agl_n"], sums["agl_sum"], sums["agl_sq"]


def _labelled(samples: Sequence[CachedSample]) -> list[CachedSample]:
    return sorted((s for s in samples if s.agl is not None and math.isfinite(s.scale)), key=lambda s: s.id)


def city_means(samples: Sequence[CachedSample]) -> dict[str, tuple[float, float]]:
    """city -> (mean AGL m, mean MAG px) over the valid pixels of the given training tiles (the
    targets' means of the 1st place's per-city R² loss): sums of the per-tile sums, so a fold's
    training split gives its own means with no file read and no leak from its validation fold."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # agl sum, mag sum, count
    for s in _labelled(samples):
        n, total, _ = target_stats(s)
        acc = totals[s.city]
        acc[0], acc[1], acc[2] = acc[0] + total, acc[1] + total * s.scale, acc[2] + n
    return {city: (a / n, m / n) for city, (a, m, n) in sorted(totals.items()) if n > 0}


def target_units(samples: Sequence[CachedSample]) -> tuple[float, float]:
    """(AGL m, MAG px): the root mean square of the valid training targets (MAG = AGL x scale).
    The model's dense heads output in these units, so a data set of 200 m towers and one of 5 m
    houses both start with outputs of the targets' size."""
    rms = stats.target_rms((n, sq, s.scale) for s in _labelled(samples) for n, _, sq in [target_stats(s)])
    if rms is None:
        return 1.0, 1.0
    return max(rms[0], MIN_UNIT), max(rms[1], MIN_UNIT)
