"""Every shipped search space's `decoder_channels` means what `models/build.py` means (c = the
narrowest decoder width, 16 = smp's default; 0 = smp's default too): the widest decoder a space
can sample is at most twice smp's default decoder for that arch. A space written with smp's own
widths in mind (256 = default) would build decoders 16x wider and 100x+ heavier.

The models are built on the meta device (shapes only, no memory, milliseconds), through the same
`build_model` a trial calls, with the smallest encoder the tests use.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from geopose_ray.config import ModelConfig
from geopose_ray.models import build_model
from geopose_ray.tune.space import SearchSpace, load_space

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))
ENCODER = "resnet18"
MAX_DECODER_RATIO = 2.0  # decoder parameters / smp's default decoder's, same arch and encoder


def _widths(space: SearchSpace, arch: str) -> list[int]:
    """Every decoder_channels a trial with this `arch` can get: the fixed value, a searched
    parameter's values when its `when` lets this arch through (conditions on other keys are taken
    as met: a bound, not a sample), else Config's default."""
    param = next((p for p in space.parameters if p.name == "decoder_channels"), None)
    if param is None:
        return [int(v) for v in space.values_of("decoder_channels")]
    allowed = dict(param.when).get("arch")
    if allowed is not None and arch not in allowed:
        return [ModelConfig().decoder_channels]
    if param.type == "choice":
        return [int(v) for v in param.values]
    return [int(param.high)]


def _decoder_params(arch: str, decoder_channels: int) -> int:
    with torch.device("meta"):
        model = build_model(ModelConfig(arch=arch, encoder=ENCODER, decoder_channels=decoder_channels))
    return sum(p.numel() for p in model.decoder.parameters())


def _archs(space: SearchSpace) -> list[str]:
    archs = space.values_of("arch")
    assert archs, f"{space.path}: arch must be fixed or a choice"
    return [str(a) for a in archs]


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_widest_sampled_decoder_is_at_most_twice_smps_default(path: Path):
    space = load_space(path)
    for arch in _archs(space):
        widest = max(_widths(space, arch))
        ratio = _decoder_params(arch, widest) / _decoder_params(arch, 0)
        assert ratio <= MAX_DECODER_RATIO, (
            f"{path.name}: {arch} with decoder_channels={widest} has {ratio:.1f}x smp's default "
            f"decoder parameters; decoder_channels is the narrowest width, 16 = smp's default"
        )


def test_widths_follow_the_arch_condition(tmp_path):
    """The helper above reads `when: {arch: [...]}`: archs outside it get Config's default."""
    path = tmp_path / "space.yaml"
    path.write_text(
        "num_samples: 2\n"
        "scheduler: {max_epochs: 2, grace_period: 1, reduction_factor: 2}\n"
        "parameters:\n"
        "  arch: {type: choice, values: [Unet, FPN], default: Unet}\n"
        "  decoder_channels: {type: choice, values: [0, 8, 24], default: 0, when: {arch: Unet}}\n"
    )
    space = load_space(path)
    assert _archs(space) == ["Unet", "FPN"]
    assert _widths(space, "Unet") == [0, 8, 24]
    assert _widths(space, "FPN") == [ModelConfig().decoder_channels]


def test_ratio_detects_smp_style_widths():
    """The check has teeth: smp's own width (256) read as c is far over the bound, 16 is exactly 1."""
    assert _decoder_params("Unet", 16) == _decoder_params("Unet", 0)
    assert _decoder_params("Unet", 256) > 10 * MAX_DECODER_RATIO * _decoder_params("Unet", 0)
