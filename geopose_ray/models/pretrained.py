"""Pretrained encoder weights through a download-once cache in the Hugging Face hub's own layout.

`encoder_weights: imagenet` means "this encoder's pretrained weights": timm's default tag for
the encoder (`tu-resnet18` -> `timm/resnet18.a1_in1k`), or the tag written in the encoder's
name (`tu-convnext_tiny.fb_in22k`), so a search over encoders maps each one to its weights. Any
other timm tag (`encoder_weights: fb_in22k`) names those weights for every encoder; a value
with a `/` or a weights suffix is a local file instead (`weights.load_encoder_weights`). The
files are timm's own (`model.safetensors` of the hub repo), loaded into the smp encoder by
`weights.load_encoder_weights` the way timm loads them.

Where: `ModelConfig.weights_cache` / `--weights-cache`, else the Hugging Face variables
`HF_HUB_CACHE`, then `HF_HOME`/hub (so a machine's existing hub cache is reused), else
`<home>/weights` (`paths.default_weights_cache`). The layout is the hub's own:
`models--timm--<name>/refs/main` holds a revision, `snapshots/<revision>/model.safetensors` the
file; `hf download timm/<name> model.safetensors --cache-dir <cache>` fills it.

Who downloads: only the search's driver, once per encoder the space can sample, before Ray starts
(`ensure`). Train workers and the ensemble resolve with `local_files_only` (no worker touches the
network, so DDP ranks never race into one cache). Offline (`HF_HUB_OFFLINE=1`) or with a file
missing, the driver stops with exit 2 and one line naming the encoder, the file and the
command that fetches it; a file that does not load into its encoder stops it the same way
(`weights.check_weights`, called by the search's pre-flight).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from pathlib import Path

from geopose_ray import paths
from geopose_ray.config import ModelConfig
from geopose_ray.errors import InputError

PRETRAINED = "imagenet"  # the encoder_weights value that asks for the encoder's own pretrained weights
WEIGHTS_FILE = "model.safetensors"  # what timm's hub repos hold
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# smp encoders that are torchvision's ResNets / ResNeXts: timm's models of the same names hold the
# same tensor names; smp's other encoders (pretrainedmodels, lukemelas) do not: use their `tu-` twin
SMP_TIMM_TWINS = {n: n for n in (*(f"resnet{d}" for d in (18, 34, 50, 101, 152)), "resnext50_32x4d")}


def default_cache() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else <home>/weights (`paths.default_weights_cache`)."""
    return paths.default_weights_cache()


def timm_name(encoder: str) -> str:
    """The timm model (and tag) whose weights an smp encoder takes: `tu-X` is timm's X; smp's own
    ResNets are torchvision's, whose tensors carry timm's names."""
    if encoder.startswith("tu-"):
        return encoder[3:]
    if encoder in SMP_TIMM_TWINS:
        return SMP_TIMM_TWINS[encoder]
    raise InputError(
        "encoder_weights", f"no hub weights known for smp encoder {encoder!r}: use its timm twin 'tu-{encoder}'"
    )


def is_hub(weights: str | None) -> bool:
    """True for `imagenet` or a timm tag; False for None or a local file path."""
    return bool(weights) and "/" not in weights and not weights.endswith(FILE_SUFFIXES)


def needs_hub(cfg: ModelConfig) -> bool:
    """True when building this model loads hub weights: `imagenet` or a tag, and no second-stage
    `init_checkpoint` (which holds every weight)."""
    return is_hub(cfg.encoder_weights) and not cfg.init_checkpoint


def hub_repo(encoder: str, tag: str = PRETRAINED) -> str:
    """The hub repo of an encoder's pretrained weights, e.g. `timm/resnet18.a1_in1k`."""
    import timm

    name = timm_name(encoder)
    if tag != PRETRAINED:
        name = f"{name.split('.')[0]}.{tag}"
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise InputError("encoder_weights", f"timm has no pretrained weights for {name!r} (encoder {encoder!r})")
    return cfg.hf_hub_id


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(
    encoder: str, tag: str = PRETRAINED, cache_dir: str | Path | None = None, download: bool = False
) -> Path:
    """The local weights file of `encoder` (`tag`: see the module doc) in `cache_dir` (default
    `default_cache()`); downloaded first when `download` and not offline. InputError naming the
    encoder, the file and the command that fetches it when it is missing."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache()
    repo = hub_repo(encoder, tag)
    try:
        path = hf_hub_download(
            repo, WEIGHTS_FILE, cache_dir=str(cache), local_files_only=not download or offline()
        )
    except (LocalEntryNotFoundError, OSError) as e:
        where = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "<revision>" / WEIGHTS_FILE
        why = "offline (HF_HUB_OFFLINE)" if offline() else str(e).splitlines()[0][:120]
        raise InputError(where, f"no pretrained weights for encoder {encoder!r} ({why}): fetch them with "
                         f"`{fetch_command(repo, cache)}`, or run once with the network") from None  # fmt: skip
    return Path(path)


def fetch_command(repo: str, cache: Path) -> str:
    """The shell command that puts `repo`'s weights into `cache` in the hub's layout."""
    return f"hf download {repo} {WEIGHTS_FILE} --cache-dir {shlex.quote(str(cache))}"


def ensure(pairs: Iterable[tuple[str, str]], cache_dir: str | Path | None = None) -> dict[tuple[str, str], Path]:
    """Download (at most once: a cached file is reused) the weights of every (encoder, tag) a
    search can sample, before any trial starts. {(encoder, tag): local file}."""
    return {(e, t): resolve(e, t, cache_dir, download=True) for e, t in sorted(set(pairs))}
