"""Pretrained encoder weights: a download-once cache in the Hugging Face hub's layout, read
offline by every worker and loaded the way timm loads them. No network: each cache is built here,
holding a timm model's own weights (random, seeded) where the hub would put them (e.g.
`timm/resnet10t.c3_in1k`)."""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from geopose_ray import paths
from geopose_ray.config import ModelConfig
from geopose_ray.errors import EXIT_BAD_INPUT, InputError, run_cli
from geopose_ray.models import build_model, pretrained
from geopose_ray.tune import launch, options

REPO = "timm/resnet10t.c3_in1k"  # timm's default tag for resnet10t
REVISION = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[1]


def hub_cache(root: Path, repo: str = REPO, content: bytes | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A hub cache holding `repo`'s file: models--timm--X/{refs/main, snapshots/REV/model.safetensors},
    the weights of timm's model of that name (seeded), or `content` as the file's bytes."""
    torch.manual_seed(7)
    model = repo.split("/")[1]
    state = {} if content else {k: v.contiguous() for k, v in timm.create_model(model).state_dict().items()}
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    if content:
        (snapshot / pretrained.WEIGHTS_FILE).write_bytes(content)
    else:
        save_file(state, str(snapshot / pretrained.WEIGHTS_FILE))
    return root, state


def not_from(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> list[str]:
    """The encoder's tensors equal to no tensor of the file: [] when every one came from it, under
    whatever name timm's features model gives it."""
    by_shape = defaultdict(list)
    for tensor in saved.values():
        by_shape[tuple(tensor.shape)].append(tensor)
    return [k for k, v in own.items() if not any(torch.equal(v, s) for s in by_shape[tuple(v.shape)])]


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


# one per family: flattened stages (ConvNeXt, the tu-convnext_tiny.fb_in22k with its
# 21841-class head), plain ResNet, EfficientNet and MobileNetV3 (timm builds their features class
# directly), RegNet
FAMILIES = ["tu-resnet10t", "tu-convnext_tiny.fb_in22k", "tu-efficientnet_b0", "tu-regnety_002",
            "tu-mobilenetv3_small_100"]  # fmt: skip


@pytest.fixture(scope="module")
def family_cache(tmp_path_factory):
    """repo -> (its hub cache, the saved tensors), each built once for the module."""
    made: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def get(repo: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if repo not in made:
            made[repo] = hub_cache(tmp_path_factory.mktemp("hub"), repo)
        return made[repo]

    return get


@pytest.mark.parametrize("encoder", FAMILIES)
def test_every_timm_family_loads_its_hub_weights(encoder, family_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, state = family_cache(pretrained.hub_repo(encoder))
    cfg = ModelConfig(arch="Unet", encoder=encoder, encoder_weights="imagenet", weights_cache=str(root))
    own = build_model(cfg).encoder.model.state_dict()
    assert len(own) > 50 and not_from(own, state) == []


def test_a_tag_names_the_weights_and_city_planes_start_at_zero(family_cache, monkeypatch):
    """`encoder_weights: fb_in22k` on `tu-convnext_tiny` takes timm/convnext_tiny.fb_in22k; with
    use_city the stem keeps the file's RGB filters and its 4 city planes start at zero."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, state = family_cache("timm/convnext_tiny.fb_in22k")
    cfg = ModelConfig(arch="Unet", encoder="tu-convnext_tiny", encoder_weights="fb_in22k", weights_cache=str(root),
                      use_city=True)  # fmt: skip
    enc = build_model(cfg).encoder.model
    stem = enc.stem_0.weight  # (96, 7, 4, 4); the file's `stem.0.weight` is (96, 3, 4, 4)
    assert torch.equal(stem[:, :3], state["stem.0.weight"]) and not stem[:, 3:].any()
    assert torch.equal(enc.stages_3.blocks[2].mlp.fc2.weight, state["stages.3.blocks.2.mlp.fc2.weight"])


def test_the_cache_is_the_flag_then_hf_hub_cache_then_hf_home_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GEOPOSE_RAY_HOME", str(tmp_path / "home"))
    for name in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    tmp = tmp_path.resolve()
    assert paths.default_weights_cache() == pretrained.default_cache() == tmp / "home" / "weights"
    monkeypatch.setenv("HF_HOME", str(tmp / "hf"))
    assert pretrained.default_cache() == tmp / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp / "hub"))
    assert pretrained.default_cache() == tmp / "hub"
    flag = options.SearchOptions(space="s.yaml", weights_cache=str(tmp / "flag"))
    assert options.weights_cache(flag) == tmp / "flag"
    assert options.weights_cache(options.SearchOptions(space="s.yaml")) == tmp / "hub"
    _, state = hub_cache(tmp / "hub")  # a model without weights_cache reads HF_HUB_CACHE's files
    model = build_model(ModelConfig(arch="Unet", encoder="tu-resnet10t", encoder_weights="imagenet"))
    assert not_from(model.encoder.model.state_dict(), state) == []
    helps = {a.dest: a.help for a in launch.build_parser()._actions}
    assert "HF_HUB_CACHE" in helps["weights_cache"] and "HF_HOME" in helps["weights_cache"]


def _space(tmp_path: Path) -> Path:
    """A one-encoder space (tu-resnet10t) with imagenet weights."""
    space = tmp_path / "space.yaml"
    space.write_text(
        "num_samples: 1\nscheduler: {max_epochs: 1, grace_period: 1, reduction_factor: 2}\n"
        "fixed: {encoder_weights: imagenet}\n"
        "parameters:\n  encoder: {type: choice, values: [tu-resnet10t], default: tu-resnet10t}\n"
    )
    return space


def _run_search(tmp_path: Path, capsys) -> tuple[int, list[str]]:
    """run_search.py on `_space` with weights from tmp_path/w: (exit code, stderr lines); Ray
    would store into tmp_path/st."""
    space = _space(tmp_path)
    spec = importlib.util.spec_from_file_location("run_search", ROOT / "run_search.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--space", str(space), "--weights-cache", str(tmp_path / "w"), "--storage", str(tmp_path / "st")]
    with pytest.raises(SystemExit) as e:
        run_cli(cli.main, argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_run_search_exits_2_before_ray_when_weights_are_missing_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _run_search(tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and len(err) == 1 and "tu-resnet10t" in err[0], err
    cache = (tmp_path / "w").resolve()
    assert f"models--timm--resnet10t.c3_in1k/snapshots/<revision>/{pretrained.WEIGHTS_FILE}" in err[0]
    assert f"`hf download {REPO} {pretrained.WEIGHTS_FILE} --cache-dir {cache}`" in err[0]
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize(("content", "problem"), [(b"not safetensors", "cannot read weights"),
                                                  (None, "not the weights of timm's resnet10t")])  # fmt: skip
def test_run_search_exits_2_before_ray_when_a_cached_file_does_not_load(content, problem, tmp_path, monkeypatch,
                                                                        capsys):  # fmt: skip
    """A corrupt file, or another architecture's (RegNet's weights in ResNet's place), would fail
    every trial on its worker: the pre-flight loads it first and names the encoder and the file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, _ = hub_cache(tmp_path / "w", "timm/regnety_002.pycls_in1k", content)
    slot = root / "models--timm--resnet10t.c3_in1k"
    (root / "models--timm--regnety_002.pycls_in1k").rename(slot)
    code, err = _run_search(tmp_path, capsys)
    assert code == EXIT_BAD_INPUT and len(err) == 1, err
    file = slot.resolve() / "snapshots" / REVISION / pretrained.WEIGHTS_FILE
    assert str(file) in err[0] and "encoder 'tu-resnet10t'" in err[0] and problem in err[0], err
    assert not (tmp_path / "st").exists()


def test_the_pre_flight_passes_files_that_load(cache, tmp_path):
    root, _ = cache
    opts = options.SearchOptions(space=str(_space(tmp_path)), weights_cache=str(root))
    found = options.prepare_weights(opts, options.load_run_space(opts))
    assert found == {("tu-resnet10t", "imagenet"): next(root.rglob(pretrained.WEIGHTS_FILE))}
