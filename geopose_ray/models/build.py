"""GeoposeModel: an smp architecture's encoder + decoder (timm encoders via `tu-`) with our heads.

Input divisibility (`GeoposeModel.divisor`, so inference can pad): Unet takes any size; the
others need H and W divisible by the encoder's output stride: 32 for most (Unet++, FPN, MAnet,
Linknet, UPerNet, Segformer), 16 for DeepLabV3Plus/PAN (dilated encoder) and DPT (patch 16),
8 for PSPNet (3-stage encoder) and DeepLabV3. PAN needs at least 128 px, fixed-size ViT
encoders their exact size. ASPP archs (DeepLabV3, DeepLabV3Plus) and UPerNet/PAN pool to 1x1
then batch-norm, so they need a training batch of 2 or more.

`ModelConfig.decoder_channels` = c > 0 sets the decoder width in units where every
architecture's smp default is c = 16 (each default width is multiplied by c / 16):
Unet / Unet++ / MAnet decoder_channels = (16c, 8c, 4c, 2c, c); FPN pyramid 16c, segmentation 8c
(GroupNorm(32): c must be a multiple of 4); DeepLabV3(Plus) / UPerNet decoder_channels 16c;
PAN decoder_channels 2c; Segformer segmentation 16c; PSPNet psp_out 32c; DPT intermediate
(16c, 32c, 64c, 64c), fusion 16c. Linknet has no width argument: c is ignored (logged).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geopose_ray.config import ModelConfig
from geopose_ray.constants import CITIES
from geopose_ray.models import pretrained
from geopose_ray.models.heads import DenseHead, DirectionHead, build_scale_head, pooled_direction
from geopose_ray.models.weights import load_encoder_weights

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_WIDTH = 16  # decoder_channels value that reproduces smp's defaults

WIDTH_KWARGS: dict[str, tuple[str, ...]] = {
    "unet": ("decoder_channels",),
    "unetplusplus": ("decoder_channels",),
    "manet": ("decoder_channels",),
    "fpn": ("decoder_pyramid_channels", "decoder_segmentation_channels"),
    "deeplabv3": ("decoder_channels",),
    "deeplabv3plus": ("decoder_channels",),
    "pan": ("decoder_channels",),
    "upernet": ("decoder_channels",),
    "segformer": ("decoder_segmentation_channels",),
    "pspnet": ("psp_out_channels",),
    "dpt": ("decoder_intermediate_channels", "decoder_fusion_channels"),
    "linknet": (),
}


@dataclass(frozen=True)
class DecoderShape:
    """What a dry run of encoder + decoder tells the heads."""

    channels: int  # decoder output channels
    stride: int  # input size / decoder output size
    deepest_channels: int  # channels of the deepest encoder map


DIRECTION_HEADS = ("global", "dense")


class GeoposeModel(nn.Module):
    """smp encoder + decoder -> {"agl" (B, 1, H, W) m, "mag" (B, 1, H, W) px, "scale" (B, 1) px/m,
    "direction" (B, 2) (sin, cos) unnormalised}. Takes the [0, 1] image and normalises it itself.

    `direction_head`: "global" pools the deepest encoder map into an MLP (the baseline's image-level
    head); "dense" also predicts the per-pixel flow vector ("flow" (B, 2, H, W) px, also returned)
    and the direction is the MAG-weighted circular mean of its directions (`heads.pooled_direction`).
    MAG keeps its own rotation-invariant head in both, so the scale fit does not depend on how sure
    the flow is of its direction.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        shape: DecoderShape,
        divisor: int = 32,
        scale_head: str = "lstsq",
        use_gsd: bool = True,
        use_city: bool = False,
        head_dropout: float = 0.0,
        direction_head: str = "global",
    ):
        super().__init__()
        if direction_head not in DIRECTION_HEADS:
            raise ValueError(f"unknown direction_head {direction_head!r}; valid: {DIRECTION_HEADS}")
        self.dense_direction = direction_head == "dense"
        self.encoder, self.decoder = encoder, decoder
        self.use_gsd, self.use_city = use_gsd, use_city
        self._divisor = divisor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # output units of the dense heads (set from the training targets, saved with the weights)
        self.register_buffer("agl_unit", torch.ones(()))  # m
        self.register_buffer("mag_unit", torch.ones(()))  # px
        self.agl_head = DenseHead(shape.channels, shape.stride, extra_channels=int(use_gsd))
        self.mag_head = DenseHead(shape.channels, shape.stride)
        self.scale_head = build_scale_head(scale_head, shape.deepest_channels, use_gsd, head_dropout)
        if self.dense_direction:
            self.flow_head = DenseHead(shape.channels, shape.stride, out_channels=2)
        else:
            self.direction_head = DirectionHead(shape.deepest_channels, dropout=head_dropout)

    @torch.no_grad()
    def set_target_units(self, agl_m: float, mag_px: float) -> None:
        """Scale the AGL head's output by `agl_m` and the MAG/flow heads' by `mag_px` (e.g. the
        targets' RMS, `data.dataset.target_units`), so that training starts at the data's scale."""
        self.agl_unit.fill_(float(agl_m))
        self.mag_unit.fill_(float(mag_px))

    @property
    def divisor(self) -> int:
        """H and W must be multiples of this (1 = any size); inference pads to it."""
        return self._divisor

    def encoder_input(self, image: Tensor, city: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) [0, 1] -> normalised image (+ 4 city one-hot planes when use_city)."""
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        if self.use_city:
            if city is None:
                raise ValueError("this model was built with use_city: pass city (B,) int64")
            onehot = F.one_hot(city.long(), len(CITIES)).to(x.dtype)  # (B, 4)
            x = torch.cat([x, onehot[:, :, None, None].expand(-1, -1, *x.shape[-2:])], dim=1)
        return x

    def forward(
        self, image: Tensor, gsd: Tensor | None = None, city: Tensor | None = None
    ) -> dict[str, Tensor]:
        h, w = image.shape[-2:]
        if h % self.divisor or w % self.divisor:
            raise ValueError(f"input {h}x{w} must be divisible by {self.divisor}; pad it first")
        if self.use_gsd and gsd is None:
            raise ValueError("this model was built with use_gsd: pass gsd (B,) m/px")
        out = self.encoder(self.encoder_input(image, city))
        if isinstance(out, tuple):  # DPT: (features, prefix_tokens)
            features, decoded = out[0], self.decoder(*out)
        else:  # smp 0.6 decoders take the feature list [x, s2, s4, s8, s16, s32]
            features, decoded = out, self.decoder(out)
        agl = (
            self.agl_head(decoded, gsd.view(-1, 1) if self.use_gsd else None) * self.agl_unit
        )  # (B, 1, H, W) m
        deepest = features[-1]  # (B, C, H/32, W/32)
        mag = self.mag_head(decoded) * self.mag_unit  # (B, 1, H, W) px
        out = {"agl": agl, "mag": mag}
        if self.dense_direction:
            out["flow"] = (
                self.flow_head(decoded) * self.mag_unit
            )  # (B, 2, H, W) px: (x = column, y = row down)
            out["direction"] = pooled_direction(out["flow"], mag.detach())  # (B, 2)
        else:
            out["direction"] = self.direction_head(deepest)  # (B, 2)
        out["scale"] = self.scale_head(agl=agl, mag=mag, deepest=deepest, gsd=gsd)  # (B, 1) px/m
        return out


def width_kwargs(arch: str, decoder_channels: int) -> dict[str, Any]:
    """smp keyword arguments that scale `arch`'s decoder width to c = decoder_channels (module doc)."""
    key = arch.lower()
    if decoder_channels <= 0:
        return {}
    if key not in WIDTH_KWARGS:
        raise ValueError(f"no decoder width mapping for arch {arch!r}; known: {sorted(WIDTH_KWARGS)}")
    if not WIDTH_KWARGS[key]:
        log.warning(
            "arch %s has no decoder width argument; decoder_channels=%d ignored", arch, decoder_channels
        )
    params = inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[key]).parameters
    out: dict[str, Any] = {}
    for name in WIDTH_KWARGS[key]:
        default = params[name].default
        scaled = [max(1, d * decoder_channels // DEFAULT_WIDTH) for d in _as_tuple(default)]
        out[name] = tuple(scaled) if isinstance(default, (tuple, list)) else scaled[0]
    return out


def _as_tuple(value: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _probe_sizes(net: nn.Module, divisor: int) -> tuple[int, ...]:
    """Small input sizes to try: a fixed ViT size, else 64 px, then larger for archs whose
    pooling pyramid needs more (PAN needs 128 px: its FPA halves the stride-16 map 3 times)."""
    img_size = getattr(getattr(getattr(net.encoder, "model", None), "patch_embed", None), "img_size", None)
    if img_size is not None:
        return (int(_as_tuple(img_size)[0]),)
    base = max(64, 2 * divisor)
    return (base, 2 * base, 4 * base)


def _dry_run(net: nn.Module, in_channels: int, size: int) -> tuple[list[Tensor], Tensor]:
    out = net.encoder(torch.zeros(1, in_channels, size, size))
    if isinstance(out, tuple):  # DPT: (features, prefix_tokens)
        return out[0], net.decoder(*out)
    return out, net.decoder(out)


@torch.no_grad()
def probe_decoder(net: nn.Module, in_channels: int, divisor: int) -> DecoderShape:
    """Dry-run encoder + decoder on a small zero input (eval mode, tens of ms) to learn the
    decoder's output channels and stride and the deepest encoder width, for any arch/encoder."""
    was_training = net.training
    net.eval()
    try:
        for size in _probe_sizes(net, divisor):
            try:
                features, decoded = _dry_run(net, in_channels, size)
                break
            except RuntimeError as e:  # input too small for this arch: try the next size
                error = e
        else:
            raise ValueError(f"encoder + decoder dry run failed: {error}") from None
    finally:
        net.train(was_training)
    dec_h, dec_w = decoded.shape[-2:]
    if size % dec_h or size % dec_w or dec_h != dec_w:
        raise ValueError(f"decoder output {dec_h}x{dec_w} does not tile a {size}x{size} input")
    return DecoderShape(int(decoded.shape[1]), size // int(dec_h), int(features[-1].shape[1]))


def build_model(cfg: ModelConfig) -> GeoposeModel:
    """Compose `cfg.arch` + `cfg.encoder` (smp, `tu-` for timm) with geopose heads.

    smp always gets encoder_weights=None (offline, a hub name retries the network before
    failing: docs/LIBRARIES.md, 'segmentation-models-pytorch 0.6');
    `cfg.encoder_weights` may name a local file, or `imagenet` / a timm tag, taken from the local
    weights cache only (`models.pretrained`: the search's driver downloads them beforehand). Either
    file is loaded by `weights.load_encoder_weights`.
    """
    in_channels = 3 + (len(CITIES) if cfg.use_city else 0)
    try:
        net = smp.create_model(
            cfg.arch,
            encoder_name=cfg.encoder,
            encoder_weights=None,
            in_channels=in_channels,
            classes=1,
            **width_kwargs(cfg.arch, cfg.decoder_channels),
        )
    except (KeyError, RuntimeError) as e:  # unknown arch / smp encoder (KeyError), timm name (RuntimeError)
        if isinstance(e, RuntimeError) and "Unknown model" not in str(e):
            raise
        raise ValueError(f"cannot build {cfg.arch} with encoder {cfg.encoder}: {e}") from None
    if pretrained.needs_hub(cfg):
        load_encoder_weights(net.encoder, pretrained.resolve(cfg.encoder, cfg.encoder_weights, cfg.weights_cache))
    elif cfg.encoder_weights:
        load_encoder_weights(net.encoder, cfg.encoder_weights)
    divisor = int(net.encoder.output_stride) if net.requires_divisible_input_shape else 1
    return GeoposeModel(
        net.encoder,
        net.decoder,
        probe_decoder(net, in_channels, divisor),
        divisor=divisor,
        scale_head=cfg.scale_head,
        use_gsd=cfg.use_gsd,
        use_city=cfg.use_city,
        head_dropout=cfg.head_dropout,
        direction_head=cfg.direction_head,
    )
