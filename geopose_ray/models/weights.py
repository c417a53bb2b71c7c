"""Load a LOCAL weights file into an smp encoder (nothing here touches the network).

Accepted files: a timm / torchvision state dict (`.pth`, `.pt`, `.bin`) or `.safetensors`, optionally
wrapped as {"state_dict": ...} / {"model": ...}, and whole-model dicts whose keys carry a
`module.` / `encoder.` / `encoder.model.` prefix.

`tu-` encoders (smp's `TimmUniversalEncoder`, whose `.model` is timm's `features_only` model, and
DPT's `TimmViTEncoder`, whose `.model` is the whole timm model) take the file the way timm itself
loads pretrained weights (docs/LIBRARIES.md, 'timm: loading weights offline'): timm builds the
model with the file as its pretrained weights, runs the family's checkpoint filter, loads, and
only then wraps the model for features, renaming the tensors where the family flattens its
stages (ConvNeXt's `stages.0.*` becomes `stages_0.*`). The tensors of that timm-built model are
then copied into smp's encoder under the very names smp uses. A name-by-name copy from the file
cannot follow that renaming, which is why it failed for such families. smp's own encoders
(torchvision's ResNets, whose tensor names are timm's) keep the name-by-name copy.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from segmentation_models_pytorch.encoders import TimmUniversalEncoder, TimmViTEncoder, get_encoder
from torch import Tensor, nn

from geopose_ray import console
from geopose_ray.errors import InputError

log = logging.getLogger(__name__)

PREFIXES = ("", "module.", "model.", "encoder.model.", "encoder.", "module.encoder.")
TIMM_ENCODERS = (TimmUniversalEncoder, TimmViTEncoder)


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
    """Load `path` into an smp encoder and say what matched: through timm's own loader for `tu-`
    encoders (strict: every tensor the encoder uses comes from the file), by tensor name for smp's
    own encoders (non-strict, logged).

    Raises InputError naming the file when it is missing, unreadable, or does not fit the encoder
    (wrong architecture), so a typo never trains from scratch silently.
    """
    sd = read_state_dict(path)
    if isinstance(encoder, TIMM_ENCODERS):
        return _load_through_timm(encoder, sd, path)
    return _load_by_name(encoder, sd, path)


def check_weights(encoder: str, path: str | Path) -> WeightsReport:
    """Load `path` into a fresh smp `encoder` (by name, e.g. `tu-convnext_tiny`) as every worker
    will, so that the search's driver refuses a file that would fail on the workers before Ray
    starts: InputError naming the encoder and the file."""
    try:
        try:
            module = get_encoder(encoder, in_channels=3, depth=5, weights=None)
        except ValueError:  # a ViT: no feature pyramid, only DPT takes it, through TimmViTEncoder
            module = TimmViTEncoder(encoder.removeprefix("tu-"), pretrained=False)
        return load_encoder_weights(module, path)
    except InputError as e:
        raise InputError(e.path, f"encoder {encoder!r}: {e.problem}") from None


def _load_by_name(encoder: nn.Module, sd: dict[str, Tensor], path: str | Path) -> WeightsReport:
    """smp's own encoders: copy the file's tensors whose names the encoder has (non-strict)."""
    own = encoder.state_dict()
    sd = _strip_best_prefix(sd, set(own))
    report = WeightsReport()
    matched: dict[str, Tensor] = {}
    for name, tensor in sd.items():
        fitted = _fit(name, tensor, own[name], report) if name in own else None
        if fitted is None:
            report.unused.append(name)
        else:
            matched[name] = fitted
    if not matched:
        raise InputError(path, f"no tensor matches encoder {type(encoder).__name__} (wrong architecture?)")
    # nn.Module's own loader: some smp encoders override load_state_dict with other signatures
    nn.Module.load_state_dict(encoder, matched, strict=False)
    report.loaded = sorted(matched)
    report.missing = sorted(set(own) - matched.keys())
    if report.missing:
        log.warning("%s: %d encoder tensors not in the file, left at init: %s", path, len(report.missing),
                    report.missing[:8])  # fmt: skip
    return report


def _load_through_timm(encoder: nn.Module, sd: dict[str, Tensor], path: str | Path) -> WeightsReport:
    """timm loads the file into its own model (`_timm_loaded`); its tensors are copied into
    `encoder.model` strictly, except the classifier, which an encoder never runs."""
    name = encoder.name.removeprefix("tu-")
    loaded = _timm_loaded(encoder, name, sd, path)
    own = encoder.model.state_dict()
    heads = _classifiers(name)
    report = WeightsReport()
    matched = {k: f for k, v in loaded.items() if k in own and (f := _fit(k, v, own[k], report)) is not None}
    report.unused = sorted(loaded.keys() - matched.keys())
    report.missing = sorted(k for k in own.keys() - matched.keys() if not _under(k, heads))
    if report.unused or report.missing:
        raise InputError(path, f"timm's {name} tensors do not fit smp's encoder: "
                         f"missing {report.missing[:3]}, unused {report.unused[:3]}")  # fmt: skip
    nn.Module.load_state_dict(encoder.model, matched, strict=False)
    report.loaded = sorted(matched)
    return report


def _timm_loaded(encoder: nn.Module, name: str, sd: dict[str, Tensor], path: str | Path) -> dict[str, Tensor]:
    """The file's tensors as timm's own loader puts them into the timm model that `encoder.model`
    is (same name, same `out_indices`), named as there.

    Two builds. First the whole model on the meta device (no memory, no init): timm's load is
    strict there, so a file missing a tensor, or another architecture's, fails here (InputError).
    Then the real one, in smp's features form, where timm loads non-strictly (it drops the head,
    and some families build their features class directly): the first build vouches for it. The
    classifier is left out of both (`num_classes=0`): an encoder never uses it, and the file's
    may have any width (`fb_in22k`: 21841 classes)."""
    import timm

    heads = _classifiers(name)
    body = _strip_best_prefix(sd, _timm_keys(name)) if _has_prefix(sd) else sd
    body = {k: v for k, v in body.items() if not _under(k, heads)}
    kwargs = dict(pretrained=True, num_classes=0)
    overlay = dict(num_classes=0, label_offset=0)  # no head in the file: nothing for timm to adapt
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op"
            timm.create_model(name, **kwargs, pretrained_cfg_overlay=dict(overlay, state_dict=dict(body)))
    except Exception as e:  # timm's filter or load_state_dict refusing the file: the file is wrong
        raise InputError(path, f"not the weights of timm's {name} ({_first_line(e)})") from None
    if isinstance(encoder, TimmUniversalEncoder):
        kwargs.update(features_only=True, out_indices=tuple(encoder.model.feature_info.out_indices))
    with console.logger_level("timm.models._builder", logging.ERROR):  # "unexpected keys": the head, vouched for above
        model = timm.create_model(name, **kwargs, pretrained_cfg_overlay=dict(overlay, state_dict=dict(body)))
    return model.state_dict()


def _classifiers(name: str) -> tuple[str, ...]:
    """The module names of a timm model's classifier (`fc`, `head.fc`, `head` + `head_dist`)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    heads = getattr(cfg, "classifier", None) or ()
    return (heads,) if isinstance(heads, str) else tuple(heads)


def _under(key: str, modules: tuple[str, ...]) -> bool:
    return any(key.startswith(m + ".") for m in modules)


def _has_prefix(sd: dict[str, Tensor]) -> bool:
    return any(k.startswith(p) for k in sd for p in PREFIXES if p)


def _timm_keys(name: str) -> set[str]:
    """Tensor names of timm's whole model (built on the meta device: no memory, no init)."""
    import timm

    with torch.device("meta"):
        return set(timm.create_model(name, num_classes=0).state_dict())


def _first_line(e: Exception) -> str:
    """The informative line of an exception: load_state_dict's second line names the keys."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"
