"""Task heads on top of an smp encoder/decoder: dense AGL/MAG maps, vector-flow scale, direction.

Units: AGL metres, MAG pixels, scale px/m, direction (sin a, cos a) unnormalised. Dense heads
output raw values (no ReLU): the losses see the real error on negative predictions and the
submission clips to [0, max] anyway, while a ReLU would kill the gradient of every pixel that
starts below zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.modules import Conv2dReLU
from torch import Tensor, nn

LSTSQ_EPS = 0.01  # baseline ScaleHead: scale = <agl, mag> / (<agl, agl> + 0.01)
MIN_HEAD_CHANNELS = 16


def _upsample_steps(stride: int) -> int:
    """Number of x2 steps that bring a decoder output at `stride` back to full resolution."""
    steps = round(math.log2(stride)) if stride >= 1 else -1
    if steps < 0 or 2**steps != stride:
        raise ValueError(f"decoder output stride must be a power of two, got {stride}")
    return steps


class DenseHead(nn.Module):
    """Decoder features (B, C, H/s, W/s) -> full-resolution maps (B, out_channels, H, W).

    Decoders that stop at stride s > 1 (FPN, DeepLabV3Plus, PAN, UPerNet, Segformer: s = 4)
    get log2(s) gradual steps of conv-bn-relu + bilinear x2 (as the 1st/2nd place heads) instead
    of smp's single x4 jump; channels halve per step, never below 16. `extra_channels`
    (the GSD plane) are concatenated to the decoder features first.
    """

    def __init__(self, in_channels: int, stride: int = 1, extra_channels: int = 0, out_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels + extra_channels
        for _ in range(_upsample_steps(stride)):
            out = max(MIN_HEAD_CHANNELS, ch // 2)
            layers += [
                Conv2dReLU(ch, out, kernel_size=3, padding=1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ]
            ch = out
        layers.append(nn.Conv2d(ch, out_channels, kernel_size=3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, features: Tensor, extra: Tensor | None = None) -> Tensor:
        if extra is not None:  # (B, E) per-image values -> constant planes
            b, _, h, w = features.shape
            planes = extra.to(features.dtype).view(b, -1, 1, 1).expand(-1, -1, h, w)
            features = torch.cat([features, planes], dim=1)
        return self.body(features)


def _mlp(in_features: int, out_features: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_features),
    )


class DirectionHead(nn.Module):
    """Deepest encoder map (B, C, h, w) -> (B, 2) = (sin a, cos a), not normalised: global
    average pool, Linear, ReLU, Dropout, Linear(2). The losses and inference normalise."""

    def __init__(self, in_channels: int, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.mlp = _mlp(in_channels, 2, hidden, dropout)

    def forward(self, deepest: Tensor) -> Tensor:
        return self.mlp(torch.flatten(F.adaptive_avg_pool2d(deepest, 1), 1))


def pooled_direction(flow: Tensor, mag: Tensor) -> Tensor:
    """Per-pixel flow (B, 2, H, W) px and MAG (B, 1, H, W) px -> the tile's direction (B, 2),
    (sin a, cos a) with norm <= 1: the MAG-weighted circular mean of the flow's directions.

    Every building pixel votes for the angle with the weight of its parallax, and flat ground
    (MAG ~ 0) abstains. Unit vectors, not the raw flow, vote: where the direction is uncertain the
    flow shrinks towards 0, and would otherwise drown. The norm is 1 when all votes agree, so the
    direction loss sees a unit vector on a coherent field. Runs in fp32.
    """
    with torch.autocast(device_type=flow.device.type, enabled=False):
        f = flow.float()
        unit = f / f.square().sum(1, keepdim=True).add(1e-6).sqrt()  # (B, 2, H, W)
        w = mag.float().clamp_min(0.0)  # (B, 1, H, W) px
        return (w * unit).sum(dim=(2, 3)) / (w.sum(dim=(2, 3)) + 1e-6)  # (B, 2)


class LstsqScaleHead(nn.Module):
    """The baseline's parameter-free scale: per-image least-squares fit of MAG (px) on AGL (m),
    scale = <agl, mag> / (<agl, agl> + 0.01) px/m. Sums over a whole tile overflow fp16 and lose
    precision in bf16, so this always runs in fp32, autocast or not."""

    def forward(self, agl: Tensor, mag: Tensor, **_: Tensor | None) -> Tensor:
        with torch.autocast(device_type=agl.device.type, enabled=False):
            a = agl.float().flatten(1)  # (B, H*W) metres
            m = mag.float().flatten(1)  # (B, H*W) pixels
            return (a * m).sum(1, keepdim=True) / ((a * a).sum(1, keepdim=True) + LSTSQ_EPS)  # (B, 1)


class LearnedScaleHead(nn.Module):
    """Pooled deepest encoder feature (+ GSD m/px) -> MLP -> softplus: a positive scale (B, 1) px/m."""

    def __init__(self, in_channels: int, use_gsd: bool, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.use_gsd = use_gsd
        self.mlp = _mlp(in_channels + int(use_gsd), 1, hidden, dropout)

    def forward(self, deepest: Tensor, gsd: Tensor | None = None, **_: Tensor | None) -> Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(deepest, 1), 1)  # (B, C)
        if self.use_gsd:
            pooled = torch.cat([pooled, gsd.to(pooled.dtype).view(-1, 1)], dim=1)
        return F.softplus(self.mlp(pooled))  # (B, 1) px/m


SCALE_HEADS: dict[str, Callable[..., nn.Module]] = {
    "lstsq": lambda in_channels, use_gsd, dropout: LstsqScaleHead(),
    "learned": lambda in_channels, use_gsd, dropout: LearnedScaleHead(in_channels, use_gsd, dropout=dropout),
}


def build_scale_head(name: str, in_channels: int, use_gsd: bool, dropout: float = 0.0) -> nn.Module:
    """Scale head by name (see SCALE_HEADS); heads take keywords agl, mag, deepest, gsd."""
    if name not in SCALE_HEADS:
        raise ValueError(f"unknown scale_head {name!r}; valid: {sorted(SCALE_HEADS)}")
    return SCALE_HEADS[name](in_channels=in_channels, use_gsd=use_gsd, dropout=dropout)
