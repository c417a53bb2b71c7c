"""`checkpoint.MODEL_SHAPE_KEYS` is exactly the set of ModelConfig fields that change the weights'
keys or shapes: every field is varied once and the model rebuilt, so a new field (or a head that
starts depending on an old one) fails here instead of as a shape mismatch on a fine-tune's worker."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from geopose_ray.checkpoint import CONFIG_FILE, MODEL_SHAPE_KEYS, check_init_checkpoint, save_state
from geopose_ray.config import Config, ModelConfig
from geopose_ray.errors import InputError
from geopose_ray.models import build_model

BASE = ModelConfig(arch="Unet", encoder="resnet18", decoder_channels=8)  # small: 12 builds on CPU
ENCODER_FILE = "encoder.pth"  # the base encoder's own weights, as a local encoder_weights file

# One other value per ModelConfig field. A new field must be added here: the test below then tells
# whether it belongs in MODEL_SHAPE_KEYS.
VARIANTS: dict[str, Any] = {
    "arch": "FPN",
    "encoder": "tu-resnet10t",
    "encoder_weights": ENCODER_FILE,  # made a path under tmp_path by _varied
    "weights_cache": "weights-cache",  # unused without hub weights, but must not matter either way
    "init_checkpoint": "stage1",  # read by the training loop, never by build_model
    "decoder_channels": 16,
    "scale_head": "learned",
    "use_gsd": not BASE.use_gsd,
    "use_city": not BASE.use_city,
    "head_dropout": 0.5,
    "direction_head": "dense",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the test box's 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(BASE)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _varied(key: str, tmp_path: Path, base_model: torch.nn.Module) -> ModelConfig:
    value = VARIANTS[key]
    if key == "encoder_weights":
        value = str(tmp_path / ENCODER_FILE)
        torch.save(base_model.encoder.state_dict(), value)
    elif key in ("weights_cache", "init_checkpoint"):
        value = str(tmp_path / value)
    return ModelConfig(**{**vars(BASE), key: value})


def test_every_model_field_has_a_variant():
    assert set(VARIANTS) == {f.name for f in fields(ModelConfig)}
    assert all(VARIANTS[k] != getattr(BASE, k) for k in VARIANTS)


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_shape_keys_are_the_fields_that_change_the_state_dict(key, tmp_path, base_model):
    """A field that reshapes the weights must be compared (else a fine-tune passes the check and
    fails or loads wrong weights on its worker); one that does not must not (else it is refused)."""
    changed = _shapes(build_model(_varied(key, tmp_path, base_model))) != _shapes(base_model)
    assert changed == (key in MODEL_SHAPE_KEYS), (
        f"{key}: the state dict {'changes' if changed else 'does not change'} but MODEL_SHAPE_KEYS "
        f"{'lacks' if changed else 'holds'} it"
    )


def _checkpoint(folder: Path, **model: Any) -> Path:
    """A checkpoint folder whose config.yaml says the model was built with `model` (no weights:
    check_init_checkpoint reads the config only)."""
    cfg = Config(model=ModelConfig(**{**vars(BASE), **model}))
    save_state(folder, {"model": {}, "config": cfg.to_dict()})
    return folder


def test_dense_direction_checkpoint_is_refused_for_a_global_config(tmp_path):
    folder = _checkpoint(tmp_path / "stage1", direction_head="dense")
    ours = Config(model=ModelConfig(**{**vars(BASE), "direction_head": "global"})).to_dict()
    with pytest.raises(InputError, match=r"direction_head='dense' \(config: 'global'\)") as err:
        check_init_checkpoint(folder, ours)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("key", MODEL_SHAPE_KEYS)
def test_every_shape_key_is_checked(key, tmp_path):
    folder = _checkpoint(tmp_path / "stage1", **{key: VARIANTS[key]})
    with pytest.raises(InputError, match=rf"{key}=") as err:
        check_init_checkpoint(folder, Config(model=BASE).to_dict())
    assert str(folder) in str(err.value)


def test_fields_that_keep_the_shapes_pass(tmp_path):
    folder = _checkpoint(tmp_path / "stage1")
    others = {k: v for k, v in VARIANTS.items() if k not in MODEL_SHAPE_KEYS}
    check_init_checkpoint(folder, {**Config(model=BASE).to_dict(), **others, "lr": 1e-5, "crop": 1024})


def test_a_key_the_saved_config_lacks_takes_configs_default(tmp_path):
    """A checkpoint written before `direction_head` existed was built with the global head, which
    is Config's default: it fits a global config and is refused for a dense one."""
    folder = _checkpoint(tmp_path / "old")
    saved = yaml.safe_load((folder / CONFIG_FILE).read_text())
    del saved["direction_head"]
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(saved))
    check_init_checkpoint(folder, Config(model=BASE).to_dict())
    with pytest.raises(InputError, match=r"direction_head='global' \(config: 'dense'\)"):
        check_init_checkpoint(folder, {**Config(model=BASE).to_dict(), "direction_head": "dense"})
