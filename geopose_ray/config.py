"""One typed config per run, built once from the flat dict that Tune samples (or a YAML file).

Keys are flat and unique across sections, so a search space, a YAML file and a Tune trial's
config all use the same names (`lr`, `encoder`, `agl_loss`, ...). `Config.from_dict` routes each
key to its section and refuses unknown keys, so a typo in a search space fails at once.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from geopose_ray.constants import TTA_NAMES
from geopose_ray.yamlio import read_yaml_mapping


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = ""  # DrivenData layout root (train/, test/, csvs); "" = the embedded synthetic set
    cache_dir: str = ""  # conversion cache; "" = <data_dir>/.geopose_cache
    fold: int = 0  # validation fold
    n_folds: int = 5
    fold_mode: str = "place"  # "place": every place in one fold (leak-free); "city": leaderboard-style
    fold_seed: int = 0  # fold assignment seed: search, refits and the ensemble must agree on it
    crop: int = 256  # random training crop, px
    batch_size: int = 4  # per worker
    val_batch_size: int = 1  # full tiles
    val_crop: int = 0  # 0 = full tiles for validation; >0 = centre crop (fast search on big tiles)
    loader_workers: int = 0  # DataLoader worker processes per Train worker
    repeat: int = 1  # dataset repeats per epoch (1st place used 4)
    epoch_samples: int = (
        0  # >0: training crops per epoch (all workers), whatever the tile count; wins over repeat
    )
    geo_aug: str = "d4"  # geometric augmentation preset: none | d4 | affine | full
    half_turns: bool = False  # each batch: ceil(batch_size / 2) crops and the same crops turned 180 deg
    foreground_crops: float = 0.0  # share of training crops centred on a built pixel (AGL > 2 m)
    photo_aug: str = "light"  # photometric preset: none | light | medium | heavy
    aug_prob: float = 0.5
    rotate_limit: float = 22.0  # degrees, affine presets
    zoom_limit: float = 0.1  # affine zoom s in [1 - z, 1 + z]
    max_train_samples: int = 0  # 0 = all; >0 truncates (smoke runs)
    max_val_samples: int = 0


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "Unet"  # any smp architecture name (Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...)
    encoder: str = "resnet34"  # any smp encoder name, timm through "tu-<name>"
    encoder_weights: str | None = None  # None, imagenet / a timm tag (models.pretrained), or a local file
    weights_cache: str | None = None  # where hub weights are cached (None: <home>/weights)
    init_checkpoint: str | None = None  # a checkpoint folder whose whole model starts this run (stage 2)
    decoder_channels: int = 0  # 0 = the architecture's default width; >0 scales Unet-like decoders
    scale_head: str = "lstsq"  # "lstsq" (parameter-free fit of MAG on AGL) | "learned"
    use_gsd: bool = True  # GSD as an extra channel of the AGL head
    use_city: bool = False  # city one-hot as extra input channels
    head_dropout: float = 0.0  # direction/scale MLP dropout
    direction_head: str = "global"  # "global" (pooled MLP) | "dense" (per-pixel flow, MAG-weighted mean)


@dataclass(frozen=True)
class LossConfig:
    agl_loss: str = "mse"  # mse | huber | focal_mse | r2_city
    mag_loss: str = "mse"
    huber_delta: float = 5.0  # metres, AGL huber
    mag_huber_delta: float = 10.0  # pixels, MAG huber
    focal_beta: float = 0.2  # focal_mse: (x-y)^2 * (2*sigmoid(beta*|x-y|) - 1)
    agl_weight: float = 1.0
    mag_weight: float = 2.0
    dir_weight: float = 10.0
    scale_weight: float = 10.0
    dir_mse_lambda: float = 1.0  # direction loss = (1 - cos) + lambda * MSE
    # weight of 1 - cos between a crop's direction and its half turn's, turned back
    # (losses.turn_consistency; needs half_turns): the views of one crop must agree
    turn_weight: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-4
    weight_decay: float = 1e-2
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine (with warm-up) | plateau | onecycle | constant
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max grad norm; 0 = off
    grad_accum: int = 1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    # NHWC activations: on an H200, bf16 training ran 1.98x as fast with them and bf16 alone 1.03x
    # (docs/BENCHMARKS.md, 'Accelerator rows'); CPU kernels gain nothing. None = on for CUDA only
    channels_last: bool | None = None
    seed: int = 0
    max_nonfinite: int = 5  # this many non-finite losses in a row stop the run
    # epochs between validations (and the last); the search sets it to ASHA's grace period, the
    # spacing of the only epochs its rungs read (tune.options.resolve_space)
    val_every: int = 1
    checkpoint_every: int = 1  # epochs; only validated epochs are checkpointed
    threads: int = 0  # torch intra-op threads per worker; 0 = leave torch's default
    ema_decay: float = 0.9999  # cap of the weight EMA's warming-up decay (train_loop.build_ema); 0 = off
    sync_every: int = 16  # micro-batches between host reads of the loss sums (1 = every one, the old loop)
    # test-time views of the last epoch's validation, reported as score_tta beside the single-view
    # score that ASHA compares: what the ensemble delivers (constants.TTA_NAMES; "none" = skip)
    final_tta: str = "d4"
    # after the last epoch, BatchNorm statistics re-measured on whole training tiles
    # (geopose_ray/precise_bn.py): the moving average of small crop batches is not them
    precise_bn: bool = True
    # > 0: also re-measure them before the validation of every N-th epoch, so that a score ASHA
    # compares mid-run is the model's, not that of its crops' moving statistics; the search sets
    # it to ASHA's grace period (its rungs are multiples of it). The weights trained do not
    # change (with the weights' average on; without it, frozen `bn_freeze` epochs would see them)
    precise_bn_every: int = 0
    # share of the last epochs trained with BatchNorm frozen at statistics re-measured on whole
    # training tiles (precise_bn.freeze), so the weights adapt to the statistics inference uses
    bn_freeze: float = 0.0

    def __post_init__(self) -> None:
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")
        if self.precise_bn_every < 0:
            raise ValueError(f"precise_bn_every must be >= 0, got {self.precise_bn_every}")
        if not 0.0 <= self.bn_freeze <= 1.0:
            raise ValueError(f"bn_freeze must be in [0, 1], got {self.bn_freeze}")
        if self.final_tta not in TTA_NAMES:
            raise ValueError(f"final_tta must be one of {TTA_NAMES}, got {self.final_tta!r}")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


@dataclass(frozen=True)
class Config:
    """Frozen, as are its sections: a run's config is built once and passed down, so no layer can
    change what another one reads. A changed copy: `replace(**flat)`, or `dataclasses.replace`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, flat: dict[str, Any], strict: bool = True) -> Config:
        """Build from flat keys; unknown keys raise ValueError unless `strict` is False."""
        owner = key_owners()
        parts: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        unknown = []
        for key, value in flat.items():
            if key in owner:
                parts[owner[key]][key] = _coerce(SECTIONS[owner[key]], key, value)
            else:
                unknown.append(key)
        if unknown and strict:
            raise ValueError(f"unknown config keys: {sorted(unknown)}; known: {sorted(owner)}")
        return cls(**{name: SECTIONS[name](**vals) for name, vals in parts.items()})

    def to_dict(self) -> dict[str, Any]:
        """Flat dict (the inverse of from_dict)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def replace(self, **flat: Any) -> Config:
        return Config.from_dict({**self.to_dict(), **flat})


def key_owners() -> dict[str, str]:
    """Flat key -> section name."""
    owner: dict[str, str] = {}
    for name, section in SECTIONS.items():
        for f in fields(section):
            assert f.name not in owner, f"duplicate config key {f.name}"
            owner[f.name] = name
    return owner


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
AUTO_BOOLS = frozenset({"channels_last"})  # booleans whose None ("auto") the device decides at run time


def _coerce(section: type, key: str, value: Any) -> Any:
    """Cast YAML/Tune values to the field's type (Tune hands numpy scalars, YAML ints for floats)."""
    default = next(f for f in fields(section) if f.name == key).default
    auto = key in AUTO_BOOLS
    if value is None or (auto and isinstance(value, str) and value.lower() == "auto"):
        return None
    if isinstance(default, bool) or auto:
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
        if not isinstance(value, str) and value in (0, 1):  # bool, numpy bool, 0 / 1
            return bool(value)
        raise ValueError(f"{key} must be true or false{' or auto' if auto else ''}, got {value!r}")
    if default is None:
        return value
    if isinstance(default, int):
        if isinstance(value, numbers.Integral):  # int, numpy integers: exact, however large
            return int(value)
        number = float(value)  # "3" and 3.0 pass; 2.7 must not become 2
        if not number.is_integer():
            raise ValueError(f"{key} must be a whole number, got {value!r}")
        return int(number)
    if isinstance(default, (float, str)):
        return type(default)(value)
    return value


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Flat config values from a YAML file of plain `key: value` pairs. (A search-space file is
    read by `tune.space.load_space` alone; its `defaults()` are its config.)"""
    return read_yaml_mapping(
        path, "YAML config", "a config file must hold a mapping of key: value", empty_ok=True
    )
