"""Which configs the refits train when they train more than one: the best, then the configs that
the search's fold cannot tell from it, other models first, then the rest by score.

A blend gains only where its members err differently. Members of one model family err alike:
their out-of-fold errors correlated at 0.96-0.97 on the embedded set, so no weighting of them could
remove more than about 2 % of the error (`ensemble/diversity.py`). A config of another family (an
encoder, a decoder, a crop, a direction head of its own) errs differently, but it only helps a
blend when it is about as good as the best, and on a fold of a few places per city the ranking
below the top is often noise. So the second refit is not simply the second score.

Whether a config is as good as the best is read off the search's own fold, city by city: the
official score is a mean of per-city scores, and both configs were scored on the same tiles, so
the per-city differences are a paired sample. A config whose mean per-city deficit is within one
standard error of that mean (sd / sqrt(cities)) is one the fold cannot tell from the best. Among
those, the refits take one config of each model family not yet chosen (best first), then fill the
remaining places by score. A config without per-city scores (no validation file) is never called
indistinguishable: it can still be chosen by score. No `ray` import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from geopose_ray.checkpoint import MODEL_SHAPE_KEYS

T = TypeVar("T")

# what makes two members err differently: the model's shape and what it is trained on
FAMILY_KEYS = (*MODEL_SHAPE_KEYS, "crop")


def family(cfg: Mapping[str, Any]) -> tuple:
    """A config's model family (the values of `FAMILY_KEYS`; a missing key counts as its own value)."""
    return tuple(repr(cfg.get(k)) for k in FAMILY_KEYS)


def paired_gap(best: Mapping[str, float], other: Mapping[str, float]) -> tuple[float, float]:
    """(mean per-city deficit of `other` against `best`, its standard error) over the cities both
    scored; the error is NaN with fewer than two such cities (nothing to estimate it from)."""
    diffs = [
        best[c] - other[c]
        for c in best
        if c in other and math.isfinite(best[c]) and math.isfinite(other[c])
    ]
    if not diffs:
        return math.nan, math.nan
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return mean, sd / math.sqrt(len(diffs))


def indistinguishable(best: Mapping[str, float] | None, other: Mapping[str, float] | None) -> bool:
    """Whether the fold cannot tell `other` from `best`: its mean per-city deficit is at most one
    standard error (see the module doc). False when either has no per-city scores."""
    if best is None or other is None:
        return False
    gap, se = paired_gap(best, other)
    return math.isfinite(gap) and math.isfinite(se) and gap <= se


def choose(
    ranked: Sequence[T],
    k: int,
    cities: Callable[[T], Mapping[str, float] | None],
    config: Callable[[T], Mapping[str, Any]],
) -> list[tuple[T, str]]:
    """The `k` configs to refit, each with why it was chosen, from `ranked` (best first; one
    entry per distinct config). `cities(entry)`: its per-city scores on the search's fold (None
    when unknown; only read when k > 1); `config(entry)`: its flat config."""
    if k <= 0 or not ranked:
        return []
    chosen: list[tuple[T, str]] = [(ranked[0], "best")]
    if k == 1:
        return chosen
    lead = cities(ranked[0])
    families = {family(config(ranked[0]))}
    for entry in ranked[1:]:
        if len(chosen) == k:
            break
        fam = family(config(entry))
        if fam not in families and indistinguishable(lead, cities(entry)):
            chosen.append((entry, "another model, as good on the search's fold"))
            families.add(fam)
    taken = {id(e) for e, _ in chosen}
    rest = [(e, "by score") for e in ranked[1:] if id(e) not in taken]
    chosen += rest[: k - len(chosen)]
    order = {id(e): i for i, e in enumerate(ranked)}
    return sorted(chosen, key=lambda c: order[id(c[0])])
