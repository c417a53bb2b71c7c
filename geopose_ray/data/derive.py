"""Defaults derived from the data (`data.stats.DataStats`), each with the reason a person reads
in the plan (`run_search.py --dry-run`).

A crop that cannot hold a roof and its footprint at once cannot teach the lean between them:
a 64 px crop is right for roofs that lean 13 px and useless for ones that lean 80. So the crop
follows the measured displacement, and the batch and the crops per epoch follow the crop so
that a step and an epoch cost the same pixels whatever the data (the search's time budget is
set in epochs). Validation tiles follow the tile size, so that a 2048 px set is validated in
windows a step can hold. A space or `--set` that names a key wins over its derived value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from geopose_ray.data.stats import DataStats

CROP_PER_DISPLACEMENT = 2  # crop side / 95th-pct displacement: a pair (roof, footprint) d px apart
# lies inside a random c px crop with chance ((c - d) / c)^2, 0.25 at c = 2d (0.56 at 4d), and
# every facade below it too; at equal pixels per step 2d gave 4x the crops per step and learned
# the angle as well as 4d (docs/LEARNING.md, 'Half turns')
MIN_CROP = 64  # px: the encoders' stride 32 leaves a 2 x 2 deepest feature map
MAX_CROP = 256  # px: at EPOCH_PX, a larger crop leaves an epoch fewer than 10 steps of MIN_BATCH
CROP_STEP = 32  # px: crops are multiples of the encoders' output stride
STEP_PX = 16 * 64 * 64  # training pixels per optimizer step (per worker): 16 crops of 64 px
EPOCH_PX = 320 * 64 * 64  # training pixels per epoch: 320 crops of 64 px
MIN_BATCH = 4  # two distinct crops and their half turns (`half_turns`): BatchNorm needs two crops
SPARSE_BUILT = 0.2  # share of built pixels below which a uniform crop often shows ground only
FOREGROUND_SHARE = 0.5  # share of crops centred on a building in a sparse city (docs/LEARNING.md)
DIR_WEIGHT_PER_PX2 = 0.16  # direction loss weight per px² of MAG rms: the MAG and flow losses are in px²
# and the direction loss is O(1), so their balance moves with the square of the roofs' lean. 0.16
# gives weight 1 at the embedded set's 2.5 px (where 10 slowed the AGL down) and 10-16 at the tall
# sets' 8-10 px (where 1 left the angle unlearned; docs/LEARNING.md, 'Sparse cities')
MIN_DIR_WEIGHT, MAX_DIR_WEIGHT = 1.0, 40.0  # the range of the losses space's search
LR_REF_BATCH = 16  # the batch a space's learning rate is for (STEP_PX in 64 px crops: the embedded set's)
MAX_EPOCH_FACTOR = 6  # every trial's epochs: at most 6 x the space's (trial_epochs); 120 of a 20-epoch
# space, which brought two seeds of a tall tune set within 0.01 of each other (docs/LEARNING.md)
FULL_TILE_VAL = 512  # px: larger tiles are validated on a centre window
VAL_STEP_PX = 16 * 128 * 128  # validation pixels per batch


@dataclass(frozen=True)
class Derived:
    key: str  # a flat Config key
    value: Any
    reason: str


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def derive(stats: DataStats, given: dict[str, Any] | None = None) -> list[Derived]:
    """The derived keys of a data set: crop, batch_size, epoch_samples, foreground_crops,
    dir_weight, val_crop and val_batch_size. Each later key follows the value that holds for the earlier ones: one that
    `given` (the space's fixed keys) sets wins over the derived one."""
    given = given or {}
    tile = stats.tile_px
    want = _round_up(CROP_PER_DISPLACEMENT * stats.disp_p95, CROP_STEP)
    crop = min(max(MIN_CROP, want), tile, MAX_CROP)
    why = (
        f"{CROP_PER_DISPLACEMENT} x the 95th-percentile displacement ({stats.disp_p95:.0f} px), in steps of "
        f"{CROP_STEP}, within [{MIN_CROP}, {min(tile, MAX_CROP)}] px"
    )
    crop_used = int(given.get("crop", crop))
    batch = max(MIN_BATCH, round(STEP_PX / crop_used**2))
    batch_used = int(given.get("batch_size", batch))
    samples = max(batch_used, round(EPOCH_PX / crop_used**2 / batch_used) * batch_used)
    samples_why = f"{EPOCH_PX // 4096} crops of 64 px per epoch, in {crop_used} px crops"
    if "crop" in given:  # a space that sets its crop sets its budget: an epoch is a pass over the tiles
        samples, samples_why = 0, "one pass over the tiles (x repeat): the space sets the crop"
    sparse = stats.built < SPARSE_BUILT
    foreground = FOREGROUND_SHARE if sparse else 0.0
    foreground_why = (
        f"sparse: {stats.built:.0%} of pixels built (< {SPARSE_BUILT:.0%}), so {foreground:.0%} of the crops "
        "are centred on a building"
        if sparse
        else f"{stats.built:.0%} of pixels built: uniform crops show buildings"
    )
    val = 0 if tile <= FULL_TILE_VAL else min(tile, max(FULL_TILE_VAL, _round_up(2 * crop_used, CROP_STEP)))
    val_side = int(given.get("val_crop", val)) or tile
    val_batch = max(1, min(16, VAL_STEP_PX // val_side**2))
    return [
        Derived("crop", crop, why),
        Derived("batch_size", batch, f"{STEP_PX // 4096} crops of 64 px per step, in {crop_used} px crops"),
        Derived("epoch_samples", samples, samples_why),
        Derived("foreground_crops", foreground, foreground_why),
        Derived(
            "dir_weight",
            round(min(MAX_DIR_WEIGHT, max(MIN_DIR_WEIGHT, DIR_WEIGHT_PER_PX2 * stats.mag_rms**2)), 1),
            f"{DIR_WEIGHT_PER_PX2} x the MAG rms² ({stats.mag_rms:.1f} px)²: keeps the direction loss in "
            f"balance with the MAG loss (px²), within [{MIN_DIR_WEIGHT:g}, {MAX_DIR_WEIGHT:g}]",
        ),
        Derived(
            "val_crop",
            val,
            "whole tiles" if val == 0 else f"a centre window of {val} px of the {tile} px tiles (2 x the crop)",
        ),
        Derived("val_batch_size", val_batch, f"{VAL_STEP_PX // 16384} tiles of 128 px per batch"),
    ]


def trial_epochs(max_epochs: int, grace_period: int, crop: int, epoch_samples: int) -> tuple[Derived, int]:
    """Every trial's budget and ASHA's grace period: the space's x (crop / MIN_CROP)², at most
    MAX_EPOCH_FACTOR x.

    A derived epoch holds the same pixels at every crop (EPOCH_PX), so a 192 px crop shows
    (64 / 192)² = 1/9 as many crops, and as many distinct roofs, as the embedded set's 64 px ones,
    and takes a ninth of the optimizer steps. A model is delivered after as many crops as the
    embedded default's budget shows, up to 6x its epochs: on a tall tune set (192 px crops) 20
    epochs left the angle unlearned in single views, 60 learned it in one seed of two, and 120 in
    both, their scores within 0.01 (docs/LEARNING.md, 'Long enough to learn the angle').

    The trials train that budget too, not only the refits: a trial ranked at a sixth of it
    predicted nothing of the delivered score (-0.69 on a single-view held-out set), so the
    search's figure is the delivered budget's, and ASHA's rungs (the grace period scaled alike)
    cut the weak trials on the way (docs/LEARNING.md, 'Trials at the delivered budget'). A space
    whose epoch is a pass over the tiles (`epoch_samples` 0) keeps its budget."""
    if epoch_samples <= 0:
        return Derived("max_epochs", max_epochs, "the space's budget: the space sets its epoch"), grace_period
    factor = min(MAX_EPOCH_FACTOR, max(1.0, (crop / MIN_CROP) ** 2))
    epochs = round(max_epochs * factor)
    grace = max(1, min(epochs, round(grace_period * factor)))
    if epochs == max_epochs:
        return Derived("max_epochs", epochs, f"the space's budget, set for {MIN_CROP} px crops (these are {crop} px)"), grace
    why = (
        f"the space's {max_epochs} x (crop {crop} / {MIN_CROP} px)² (at most x {MAX_EPOCH_FACTOR:g}), ASHA's grace "
        f"{grace_period} alike ({grace}): as many crops as 64 px ones would show; fewer left the angle half learned"
    )
    return Derived("max_epochs", epochs, why), grace


def lr_factor(batch: int) -> float:
    """Learning-rate factor for a batch other than LR_REF_BATCH: Adam's square-root scaling rule
    (the gradient noise grows as 1 / sqrt(batch)). On tune-tall-384 (batch 4: two crops and their
    half turns) 3e-3 left the seeds 0.23 apart; smaller rates learned the angle more often
    (docs/LEARNING.md, 'Sparse cities')."""
    return math.sqrt(batch / LR_REF_BATCH)


def apply(fixed: dict[str, Any], searched: list[str], derived: list[Derived]) -> tuple[dict[str, Any], list[str]]:
    """`fixed` with every derived key that the space neither fixes nor searches; and the plan's
    lines, one per key, saying which value holds and why."""
    out, lines = dict(fixed), []
    for d in derived:
        if d.key in searched:
            lines.append(f"{d.key:<16} searched by the space (derived would be {d.value}: {d.reason})")
        elif d.key in fixed:
            lines.append(f"{d.key:<16} {fixed[d.key]!s:<6} set by the space or --set (derived: {d.value})")
        else:
            out[d.key] = d.value
            lines.append(f"{d.key:<16} {d.value!s:<6} {d.reason}")
    return out, lines
