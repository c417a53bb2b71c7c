"""Pretrained encoder weights: a download-once cache in the Hugging Face hub's layout, read
offline by every worker. No network: the cache is built here, holding a small timm model's own
weights (random, seeded) where the hub would put `timm/resnet10t.c3_in1k`."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from geopose_ray.config import ModelConfig
from geopose_ray.errors import EXIT_BAD_INPUT, InputError, run_cli
from geopose_ray.models import build_model, pretrained

REPO = "timm/resnet10t.c3_in1k"  # timm's default tag for resnet10t
REVISION = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[1]


def hub_cache(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A hub cache holding resnet10t weights: models--timm--X/{refs/main, snapshots/REV/model.safetensors}."""
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}
    repo = root / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / pretrained.WEIGHTS_FILE))
    return root, state


@pytest.fixture
def cache(tmp_path, monkeypatch) -> tuple[Path, dict[str, torch.Tensor]]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache(tmp_path / "weights")


def test_imagenet_weights_reach_the_encoder_bit_for_bit(cache):
    root, state = cache
    model = build_model(ModelConfig(arch="Unet", encoder="tu-resnet10t", encoder_weights="imagenet", weights_cache=str(root)))
    own = model.encoder.model.state_dict()
    loaded = [k for k in own if k in state]
    assert len(loaded) > 50 and all(torch.equal(own[k], state[k]) for k in loaded)
    scratch = build_model(ModelConfig(arch="Unet", encoder="tu-resnet10t"))
    assert not torch.equal(scratch.encoder.model.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


def test_the_driver_resolves_once_and_workers_only_read_the_cache(cache, monkeypatch):
    """One network-capable resolution per encoder, before any trial; each worker's build (here two
    trials x two workers) asks the cache with local_files_only."""
    import huggingface_hub

    root, _ = cache
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online: the driver may download
    real = huggingface_hub.hf_hub_download
    asked: list[bool] = []

    def spy(*args, **kwargs):
        asked.append(kwargs["local_files_only"])
        return real(*args, **{**kwargs, "local_files_only": True})  # never the network in a test

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    assert pretrained.ensure([("tu-resnet10t", "imagenet")] * 2, root) == {
        ("tu-resnet10t", "imagenet"): next(root.rglob(pretrained.WEIGHTS_FILE))
    }
    cfg = ModelConfig(arch="Unet", encoder="tu-resnet10t", encoder_weights="imagenet", weights_cache=str(root))
    for _ in range(2 * 2):
        build_model(cfg)
    assert asked == [False, True, True, True, True]


def test_offline_and_missing_names_the_encoder_and_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"tu-resnet10t.*offline") as e:
        pretrained.ensure([("tu-resnet10t", "imagenet")], tmp_path / "empty")
    assert "models--timm--resnet10t.c3_in1k" in e.value.path and pretrained.WEIGHTS_FILE in e.value.path
    with pytest.raises(InputError, match="tu-resnet10t"):  # a worker never downloads either
        build_model(ModelConfig(arch="Unet", encoder="tu-resnet10t", encoder_weights="imagenet",
                                weights_cache=str(tmp_path / "empty")))  # fmt: skip
    with pytest.raises(InputError, match="tu-efficientnet-b0"):  # smp's own EfficientNet: use timm's
        pretrained.timm_name("efficientnet-b0")


@pytest.mark.parametrize(("weights", "hub"), [("imagenet", True), ("fb_in22k", True), ("/w/r18.pth", False),
                                              ("r18.safetensors", False), (None, False)])  # fmt: skip
def test_hub_names_and_files(weights, hub):
    assert pretrained.is_hub(weights) is hub


def test_run_search_exits_2_before_ray_when_weights_are_missing_offline(tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    space = tmp_path / "space.yaml"
    space.write_text(
        "num_samples: 1\nscheduler: {max_epochs: 1, grace_period: 1, reduction_factor: 2}\n"
        "fixed: {encoder_weights: imagenet}\n"
        "parameters:\n  encoder: {type: choice, values: [tu-resnet10t], default: tu-resnet10t}\n"
    )
    spec = importlib.util.spec_from_file_location("run_search", ROOT / "run_search.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--space", str(space), "--weights-cache", str(tmp_path / "w"), "--storage", str(tmp_path / "st")]
    with pytest.raises(SystemExit) as e:
        run_cli(cli.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == EXIT_BAD_INPUT and len(err) == 1 and "tu-resnet10t" in err[0], err
    assert not (tmp_path / "st").exists()
