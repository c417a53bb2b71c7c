"""Models: every decoder x two small encoders builds and trains one step at full resolution;
city/gsd inputs and scale-head variants behave; local weights load; bad files raise InputError."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from geopose_ray.config import ModelConfig
from geopose_ray.errors import InputError
from geopose_ray.models import GeoposeModel, build_model
from geopose_ray.models.build import width_kwargs

ARCHS = ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "MAnet", "Linknet", "PAN", "UPerNet", "Segformer"]
ENCODERS = ["resnet18", "tu-resnet18"]
MIN_SIZE = {"PAN": 128}  # PAN's pyramid pooling needs a 128 px input


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core box two OpenMP threads spin against the other
    engineers' jobs and run this file several times slower
    (docs/BENCHMARKS.md, 'Figures moved from code comments')."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(b: int = 2, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, size, size, generator=g)  # [0, 1]
    gsd = torch.full((b,), 0.5)  # m/px
    city = torch.arange(b) % 4
    return image, gsd, city


def _check_outputs(out: dict[str, torch.Tensor], b: int, size: int) -> None:
    assert set(out) == {"agl", "mag", "scale", "direction"}
    assert out["agl"].shape == out["mag"].shape == (b, 1, size, size)
    assert out["scale"].shape == (b, 1) and out["direction"].shape == (b, 2)
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_trains_one_step_at_full_resolution(arch, encoder):
    """Native encoders at smp's default decoder width, timm ones at a narrow width (c = 8)."""
    torch.manual_seed(0)
    width = 8 if encoder.startswith("tu-") else 0
    model = build_model(ModelConfig(arch=arch, encoder=encoder, decoder_channels=width))
    assert isinstance(model, GeoposeModel)
    size = MIN_SIZE.get(arch, 64)
    assert size % model.divisor == 0
    image, gsd, city = _inputs(size=size)
    out = model(image, gsd, city)
    _check_outputs(out, 2, size)
    sum(v.square().mean() for v in out.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # every head is used


def test_dpt_with_a_timm_vit():
    model = build_model(ModelConfig(arch="DPT", encoder="tu-test_vit"))
    _check_outputs(model(*_inputs()[:2]), 2, 64)


def test_divisor_unet_any_size_others_pad():
    unet = build_model(ModelConfig(arch="Unet", encoder="resnet18"))
    assert unet.divisor == 1
    gsd = torch.full((2,), 0.5)
    out = unet(torch.rand(2, 3, 66, 70), gsd)
    assert out["agl"].shape == out["mag"].shape == (2, 1, 66, 70)
    fpn = build_model(ModelConfig(arch="FPN", encoder="resnet18"))
    assert fpn.divisor == 32
    with pytest.raises(ValueError, match="divisible by 32"):
        fpn(torch.rand(2, 3, 80, 80), gsd)


def test_city_input_changes_prediction():
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18", use_city=True)).eval()
    image, gsd, _ = _inputs(b=1)
    with torch.no_grad():
        a = model(image, gsd, torch.tensor([0]))["agl"]
        b = model(image, gsd, torch.tensor([3]))["agl"]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="city"):
        model(image, gsd)


def test_gsd_feeds_agl_only():
    model = build_model(ModelConfig(arch="FPN", encoder="resnet18", use_gsd=True)).eval()
    image, _, city = _inputs(b=1)
    with torch.no_grad():
        a = model(image, torch.tensor([0.3]), city)
        b = model(image, torch.tensor([0.6]), city)
    assert not torch.allclose(a["agl"], b["agl"])
    assert torch.equal(a["mag"], b["mag"])
    with pytest.raises(ValueError, match="gsd"):
        model(image)
    no_gsd = build_model(ModelConfig(arch="FPN", encoder="resnet18", use_gsd=False))
    _check_outputs(no_gsd(torch.rand(2, 3, 64, 64)), 2, 64)


def test_lstsq_scale_is_the_fp32_fit_of_mag_on_agl():
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18", scale_head="lstsq")).eval()
    image, gsd, city = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, gsd, city)
    assert out["scale"].dtype == torch.float32
    a, m = out["agl"].float().flatten(1), out["mag"].float().flatten(1)
    expected = (a * m).sum(1) / ((a * a).sum(1) + 0.01)
    torch.testing.assert_close(out["scale"].view(-1), expected)


def test_learned_scale_head_is_positive_and_trainable():
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18", scale_head="learned", head_dropout=0.2))
    out = model(*_inputs())
    assert (out["scale"] > 0).all()
    out["scale"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.scale_head.parameters())


def test_unknown_names_raise_value_error():
    with pytest.raises(ValueError, match="learned"):
        build_model(ModelConfig(arch="Unet", encoder="resnet18", scale_head="magic"))
    with pytest.raises(ValueError, match="NoSuchArch"):
        build_model(ModelConfig(arch="NoSuchArch", encoder="resnet18"))
    for encoder in ("resnet1800", "tu-resnet1800"):
        with pytest.raises(ValueError, match="resnet1800"):
            build_model(ModelConfig(arch="Unet", encoder=encoder))


@pytest.mark.parametrize("arch", ["Unet", "FPN", "DeepLabV3Plus"])
def test_decoder_channels_scale_width(arch):
    def n_params(c: int) -> int:
        model = build_model(ModelConfig(arch=arch, encoder="resnet18", decoder_channels=c))
        return sum(p.numel() for p in model.decoder.parameters())

    assert n_params(16) == n_params(0)  # c = 16 reproduces smp's defaults
    assert n_params(8) < n_params(16)


def test_unet_decoder_channels_mapping():
    assert width_kwargs("Unet", 8) == {"decoder_channels": (128, 64, 32, 16, 8)}
    assert width_kwargs("Linknet", 8) == {}


@pytest.fixture(scope="module")
def timm_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return timm.create_model("resnet18", pretrained=False).state_dict()


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads_into_encoder(tmp_path, timm_resnet18, encoder, suffix):
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(timm_resnet18, str(path))
    else:
        torch.save(timm_resnet18, path)
    model = build_model(ModelConfig(arch="Unet", encoder=encoder, encoder_weights=str(path)))
    enc = model.encoder.model if encoder.startswith("tu-") else model.encoder
    torch.testing.assert_close(enc.conv1.weight, timm_resnet18["conv1.weight"])
    torch.testing.assert_close(enc.layer4[1].conv2.weight, timm_resnet18["layer4.1.conv2.weight"])


def test_weights_with_city_channels_keep_rgb_and_zero_extras(tmp_path, timm_resnet18):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": timm_resnet18}, path)
    model = build_model(
        ModelConfig(arch="Unet", encoder="tu-resnet18", encoder_weights=str(path), use_city=True)
    )
    w = model.encoder.model.conv1.weight  # (64, 7, 7, 7)
    assert w.shape[1] == 7
    torch.testing.assert_close(w[:, :3], timm_resnet18["conv1.weight"])
    assert (w[:, 3:] == 0).all()


def test_bad_weights_files_raise_input_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(InputError, match=r"nope\.pth"):
        build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=str(missing)))
    with pytest.raises(InputError, match="resnet18"):  # hub weights: only ever read from the cache here
        empty = str(tmp_path / "empty_cache")
        build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights="imagenet", weights_cache=empty))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match=r"corrupt\.pth"):
        build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=str(corrupt)))
    foreign = tmp_path / "foreign.pth"
    torch.save({"blocks.0.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(InputError, match=r"foreign\.pth"):
        build_model(ModelConfig(arch="Unet", encoder="tu-resnet18", encoder_weights=str(foreign)))
