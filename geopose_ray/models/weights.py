"""Load a LOCAL weights file into an smp encoder (nothing here touches the network).

Accepted files: a timm / torchvision state dict (`.pth`, `.pt`, `.bin`) or `.safetensors`, optionally
wrapped as {"state_dict": ...} / {"model": ...}, and whole-model dicts whose keys carry a
`module.` / `encoder.` / `encoder.model.` prefix. `tu-` encoders load into the timm model at
`encoder.model`, native smp encoders into `encoder` itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from segmentation_models_pytorch.encoders import TimmUniversalEncoder
from torch import Tensor, nn

from geopose_ray.errors import InputError

log = logging.getLogger(__name__)

PREFIXES = ("", "module.", "model.", "encoder.model.", "encoder.", "module.encoder.")


@dataclass
class WeightsReport:
    """What a load did: keys loaded, model keys left at their init, file keys not used."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    widened: list[str] = field(default_factory=list)  # first conv: 3 RGB channels + zero extras


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors or torch pickle file; InputError if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "encoder weights file not found (only local files are supported)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: any reader error is the user's file
        raise InputError(path, f"cannot read weights ({e.__class__.__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not any(isinstance(v, Tensor) for v in sd.values()):
        raise InputError(path, "not a state dict of tensors")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def _strip_best_prefix(sd: dict[str, Tensor], target_keys: set[str]) -> dict[str, Tensor]:
    """The file's keys with the prefix that matches most target keys removed."""

    def strip(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    return max((strip(p) for p in PREFIXES), key=lambda d: len(target_keys & d.keys()))


def _fit(name: str, src: Tensor, dst: Tensor, report: WeightsReport) -> Tensor | None:
    """`src` reshaped for `dst`, or None. A conv weight with 3 input channels going into a wider
    first conv (city one-hot channels) keeps RGB and starts the extra channels at zero, so the
    pretrained features are unchanged until training learns to use the city."""
    if src.shape == dst.shape:
        return src
    same_but_inputs = src.ndim == 4 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]
    if same_but_inputs and src.shape[1] == 3 and dst.shape[1] > 3:
        report.widened.append(name)
        out = torch.zeros_like(dst)
        out[:, :3] = src
        return out
    return None


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> WeightsReport:
    """Load `path` into an smp encoder (non-strict) and say what matched.

    Raises InputError naming the file when it is missing, unreadable, or when not a single
    tensor matched the encoder (wrong architecture), so a typo never trains from scratch silently.
    """
    target = encoder.model if isinstance(encoder, TimmUniversalEncoder) else encoder
    own = target.state_dict()
    sd = _strip_best_prefix(read_state_dict(path), set(own))
    report = WeightsReport()
    matched: dict[str, Tensor] = {}
    for name, tensor in sd.items():
        fitted = _fit(name, tensor, own[name], report) if name in own else None
        if fitted is None:
            report.unused.append(name)
        else:
            matched[name] = fitted
    if not matched:
        raise InputError(path, f"no tensor matches encoder {type(target).__name__} (wrong architecture?)")
    # nn.Module's own loader: some smp encoders override load_state_dict with other signatures
    nn.Module.load_state_dict(target, matched, strict=False)
    report.loaded = sorted(matched)
    report.missing = sorted(set(own) - matched.keys())
    if report.missing:
        log.warning(
            "%s: %d encoder tensors not in the file, left at init: %s",
            path,
            len(report.missing),
            report.missing[:8],
        )
    return report
