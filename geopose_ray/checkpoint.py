"""Checkpoint folders: `state.pt` (weights, optimizer, scaler, scheduler, epoch, RNG, flat config)
plus a readable `config.yaml`, both written atomically.

A checkpoint folder is what Ray Train uploads, what `train.py` keeps as the best model and what
the ensemble loads, so one format serves all three. No `ray` import here.
"""

from __future__ import annotations

import copy
import os
import pickle
import random
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from geopose_ray.atomic import atomic_path, atomic_write_text
from geopose_ray.config import Config
from geopose_ray.errors import InputError
from geopose_ray.yamlio import read_yaml_mapping

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
VAL_SCORE_FILE = "val_score.npy"  # GeoposeScore.to_array() of the validation fold at this checkpoint
STAGING_PREFIX = "geopose-ckpt-"  # + "<pid>@<host>@" + tempfile's random part (no "@" in either)


class NonFiniteWeightsError(RuntimeError):
    """Raised instead of writing a checkpoint whose weights hold NaN or inf."""


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain Python values, so that the
    state loads with `weights_only=True` (no pickled numpy objects)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_gauss": [int(np_state["has_gauss"]), float(np_state["gauss"])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def make_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: Any,
    epoch: int,
    cfg: Config,
    nonfinite_total: int = 0,
    val_score: np.ndarray | None = None,
    ema_model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """The checkpoint state (ARCHITECTURE.md): `epoch` = completed epochs, model unwrapped;
    `val_score`: the validation fold's metric accumulators at this epoch, when known; "ema": the
    weights' moving average, when trained with one (what was validated, and what predicts).

    A snapshot: every tensor is copied, since training updates weights and moments in place.
    """
    state = {
        "model": {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scaler": copy.deepcopy(scaler.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "epoch": epoch,
        "rng": rng_state(),
        "config": cfg.to_dict(),
        "nonfinite_total": nonfinite_total,
    }
    if ema_model is not None:
        state["ema"] = {k: v.detach().to("cpu", copy=True) for k, v in ema_model.state_dict().items()}
    if val_score is not None:  # a copy (np.array), as the docstring promises
        state["val_score"] = torch.from_numpy(np.array(val_score, dtype=np.float64))
    return state


def restore_state(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: Any,
    cfg: Config,
    rank: int = 0,
) -> int:
    """Load a checkpoint state; returns the number of completed epochs. Rank 0 restores the saved
    RNG exactly; other ranks reseed by rank and epoch (the state holds rank 0's RNG only)."""
    load_weights(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:  # empty when saved by a disabled scaler (CPU / bf16 / fp32 runs)
        scaler.load_state_dict(state["scaler"])
    scheduler.load_state_dict(state["scheduler"])
    epoch = int(state["epoch"])
    if rank == 0:
        set_rng_state(state["rng"])
    else:
        seed = cfg.train.seed + 1000 * epoch + rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
    return epoch


UNIT_BUFFERS = ("agl_unit", "mag_unit")  # GeoposeModel output units, absent from older checkpoints


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(weights)`, strict, except that a checkpoint written before the
    dense heads had output units loads with units of 1 (which is what it was trained with)."""
    weights = dict(weights)
    for name in UNIT_BUFFERS:
        if name in model.state_dict() and name not in weights:
            weights[name] = torch.ones(())
    model.load_state_dict(weights)


def inference_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights that predict: the moving average when the run kept one, else the raw weights."""
    return state.get("ema", state["model"])


def _check_finite(weights: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeightsError(f"refusing to save a checkpoint with non-finite weights: {bad[:5]}")


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `directory/state.pt` (and `config.yaml` when the state has a config) atomically.

    Raises NonFiniteWeightsError, writing nothing, if any model weight is NaN or inf: a broken
    checkpoint must never be picked as a run's best or resumed from.
    """
    directory = Path(directory)
    _check_finite(state["model"])
    if "ema" in state:
        _check_finite(state["ema"])
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / STATE_FILE) as tmp:
        torch.save(state, tmp)
    if "config" in state:
        atomic_write_text(directory / CONFIG_FILE, yaml.safe_dump(dict(state["config"]), sort_keys=True))
    if "val_score" in state:  # beside state.pt, so a reader need not load the weights
        with atomic_path(directory / VAL_SCORE_FILE) as tmp, open(tmp, "wb") as f:
            np.save(f, state["val_score"].numpy())
    return directory / STATE_FILE


@contextmanager
def staging_dir(root: str | Path | None = None) -> Iterator[Path]:
    """A fresh folder to write a checkpoint into before Ray uploads it, removed afterwards.

    A worker killed while it holds one (ASHA stops its trial during a report, a node is lost)
    never removes it, and each is a whole checkpoint; they piled up in /tmp
    (docs/BENCHMARKS.md, 'Figures moved from code comments'). So the name carries
    the writer's host and PID, and each new folder first removes those of this host's writers
    that are gone. Folders of live processes and of other hosts (a shared /tmp) are never
    touched."""
    root = Path(root if root is not None else tempfile.gettempdir())
    host = socket.gethostname()
    for path in root.glob(f"{STAGING_PREFIX}*@{host}@*"):
        pid, folder_host, _ = path.name[len(STAGING_PREFIX) :].split("@", 2)
        if folder_host == host and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}@{host}@", dir=root) as tmp:
        yield Path(tmp)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load `directory/state.pt` with `weights_only=True` (tensors and plain values only)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise InputError(path, "checkpoint state file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise InputError(path, f"cannot load checkpoint ({e.__class__.__name__})") from None


def init_from_checkpoint(model: torch.nn.Module, directory: str | Path) -> None:
    """Start `model` from another run's weights: a second stage, as the 1st place fine-tuned its
    stage-1 models with larger crops. Only the weights: optimizer, schedule and epoch start
    afresh. The architecture must match exactly (a mismatch names the folder, exit 2)."""
    weights = inference_weights(load_state(directory))
    try:
        load_weights(model, weights)
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise InputError(directory, f"init_checkpoint does not fit this model ({first[:200]})") from None


# The ModelConfig fields that change the state dict's keys or shapes (models/build.py, heads.py):
# the smp model and its input channels (use_city), the decoder width, the AGL head's GSD plane,
# the learned scale MLP, and the direction head (global MLP vs dense flow head). Fields that only
# change values or behaviour (encoder_weights, weights_cache, init_checkpoint, head_dropout) stay
# out, or a fine-tune would be refused for nothing. tests/test_checkpoint_shape_keys.py builds the
# model with each ModelConfig field varied and fails when this list and the shapes disagree.
MODEL_SHAPE_KEYS = (
    "arch",
    "encoder",
    "decoder_channels",
    "scale_head",
    "use_gsd",
    "use_city",
    "direction_head",
)


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    """The flat config of a checkpoint folder, from its config.yaml (no weights loaded)."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise InputError(folder, f"not a checkpoint folder ({STATE_FILE} not found)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InputError(path, "file not found (every checkpoint folder has one)")
    return read_yaml_mapping(path, "YAML", "expected a mapping of config keys")


def check_init_checkpoint(directory: str | Path, flat_config: dict[str, Any]) -> None:
    """Before a search starts: the folder holds a checkpoint whose model the config rebuilds (the
    keys that shape the weights agree), so no trial fails on its worker with a shape mismatch.
    Reads the folder's config.yaml only: the weights may be hundreds of MB."""
    # Both sides through Config, as load_model_from_checkpoint rebuilds a model: a key the saved
    # config lacks (written before the field existed) takes Config's default, values coerce alike.
    saved_flat = read_checkpoint_config(directory)
    try:
        saved = Config.from_dict(saved_flat, strict=False).to_dict()
    except (TypeError, ValueError) as e:
        raise InputError(Path(directory) / CONFIG_FILE, f"not a valid config ({e})") from None
    ours = Config.from_dict(flat_config, strict=False).to_dict()
    differ = [f"{k}={saved[k]!r} (config: {ours[k]!r})" for k in MODEL_SHAPE_KEYS if saved[k] != ours[k]]
    if differ:
        raise InputError(
            directory, f"init_checkpoint was trained with {', '.join(differ)}: --set them to match"
        )


def load_model_from_checkpoint(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config]:
    """Rebuild the model from the checkpoint's own flat config, load its weights, set eval mode."""
    from geopose_ray.models import build_model

    state = load_state(directory, map_location)
    # the checkpoint holds every weight: never fetch pretrained ones
    cfg = Config.from_dict({**state["config"], "encoder_weights": None}, strict=False)
    model = build_model(cfg.model)
    load_weights(model, inference_weights(state))
    return model.to(map_location).eval(), cfg
