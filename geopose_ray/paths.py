"""Default locations, all under one home folder (env GEOPOSE_RAY_HOME, default ./runs).

Every path can be overridden on the command line; these are only the embedded defaults.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("GEOPOSE_RAY_HOME", "runs")).expanduser().resolve()


def default_data_dir() -> Path:
    """Where the embedded synthetic data set is generated when no --data is given."""
    return home() / "synthetic"


def default_storage() -> Path:
    """Ray Tune / Train storage_path for experiments."""
    return home() / "experiments"


def storage_cache() -> Path:
    """Local mirror of remote experiment storage (`<this>/<bucket>/<prefix>/...`): the report,
    the default Optuna SQLite file and the checkpoints the ensemble loads."""
    return home() / "cache"


def default_weights_cache() -> Path:
    """Pretrained encoder weights (the hub's cache layout, `models/pretrained.py`) when no
    `--weights-cache` / `ModelConfig.weights_cache` is given: the Hugging Face hub's own cache
    when the environment names one (HF_HUB_CACHE, else HF_HOME/hub, as huggingface_hub reads them),
    so files a machine already holds are reused; else <home>/weights. Named here so that a dry
    run can look into it without importing the models (torch, timm)."""
    for name, sub in (("HF_HUB_CACHE", ""), ("HF_HOME", "hub")):
        if os.environ.get(name):
            return (Path(os.path.expandvars(os.environ[name])).expanduser() / sub).resolve()
    return home() / "weights"


def default_cache_dir(data_dir: str | Path) -> Path:
    """Conversion cache beside the data unless --cache says otherwise."""
    return Path(data_dir).resolve() / ".geopose_cache"
