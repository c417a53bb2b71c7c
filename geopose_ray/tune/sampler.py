"""Which Optuna sampler proposes a search's trials: by name (`run_search.py --sampler`, else the
space file's `sampler:`), or `auto`, by the trial budget from the table `AUTO`.

`REGISTRY` maps a name to its Optuna class and the settings it gets for a budget; `resolve`
turns the request into a `SamplerChoice` (the name, why, the settings) that the plan prints, the
options file records and `build` makes into the sampler `tuner.build_searcher` hands to Ray's
OptunaSearch. No `ray`, and `optuna` only inside `build`: a dry run stays fast.

`auto` is random search at every budget until `bench/search_value.py` shows a model-based
sampler beating it by more than the seed spread at that budget (docs/SEARCH_VALUE.md, 'Rule for auto'):
a measurement changes one row of `AUTO`. What each sampler does with this project's spaces
(conditional `when:` parameters, choices), probed with Optuna 5.1: docs/SEARCH_VALUE.md, 'Samplers'.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geopose_ray.errors import InputError

AUTO_NAME = "auto"
BENCH_DOC = "docs/SEARCH_VALUE.md"  # the bench's figures behind `AUTO`
NOT_MEASURED = "not measured"
MAX_STARTUP = 10  # Optuna's own default for TPE and GP: random trials before the model proposes


@dataclass(frozen=True)
class AutoRow:
    """One budget range of `auto`: trials low..high (None: no upper bound) -> sampler."""

    low: int
    high: int | None
    sampler: str
    evidence: str  # the bench's figures that put `sampler` here, or NOT_MEASURED

    def holds(self, trials: int) -> bool:
        return self.low <= trials and (self.high is None or trials <= self.high)


# The bench measures at 6 trials (smoke.yaml) and 24; 64 trials (architectures.yaml) is a GPU
# budget it does not reach. A model-based sampler enters a row only with the figures that show it
# beating random search by more than the seed spread there (docs/SEARCH_VALUE.md, 'Rule for auto').
AUTO: tuple[AutoRow, ...] = (
    AutoRow(1, 11, "random", NOT_MEASURED),
    AutoRow(12, 47, "random", NOT_MEASURED),
    AutoRow(48, None, "random", NOT_MEASURED),
)


def startup_trials(trials: int) -> int:
    """Random trials before TPE or GP model the results (the defaults' trial is one of them):
    Optuna's 10 would leave a 6-trial search all random; a quarter of the budget, at least 2."""
    return min(MAX_STARTUP, max(2, trials // 4))


def _no_settings(trials: int, concurrent: int) -> dict[str, Any]:
    return {}


def _tpe_settings(trials: int, concurrent: int) -> dict[str, Any]:
    """Multivariate TPE over groups of parameters that occur together (the `when:` branches);
    with trials running at once, the constant liar keeps it from proposing their neighbours."""
    return {
        "multivariate": True,
        "group": True,
        "constant_liar": concurrent > 1,
        "n_startup_trials": startup_trials(trials),
    }


def _gp_settings(trials: int, concurrent: int) -> dict[str, Any]:
    """GPSampler models only the parameters every trial has: a `when:` parameter is drawn by its
    independent RandomSampler, each time with a warning, silenced here (docs/SEARCH_VALUE.md, 'Samplers')."""
    return {"n_startup_trials": startup_trials(trials), "warn_independent_sampling": False}


@dataclass(frozen=True)
class Builder:
    """An Optuna sampler class (in `optuna.samplers`), its settings for (trials, trials at once),
    and the packages it needs beyond optuna."""

    optuna_class: str
    settings: Callable[[int, int], dict[str, Any]]
    needs: tuple[str, ...] = ()


REGISTRY: dict[str, Builder] = {
    "random": Builder("RandomSampler", _no_settings),
    "tpe": Builder("TPESampler", _tpe_settings),
    "gp": Builder("GPSampler", _gp_settings, needs=("torch", "scipy")),
}
NAMES = (AUTO_NAME, *REGISTRY)


@dataclass(frozen=True)
class SamplerChoice:
    """The sampler a search runs with, and why."""

    name: str  # a REGISTRY key
    requested: str  # what was asked for: auto or a REGISTRY key
    source: str  # "--sampler", the space file, or "default"
    reason: str  # one line for the plan
    settings: dict[str, Any] = field(default_factory=dict)  # the sampler's keyword arguments, seed aside

    def record(self) -> dict[str, Any]:
        """What the options file keeps (and a resume compares: `name`)."""
        return {"name": self.name, "requested": self.requested, "source": self.source,
                "reason": self.reason, "settings": self.settings}  # fmt: skip


def check_name(name: Any, where: str | Path) -> str:
    """`name` when it is a sampler's name, else InputError naming `where` (the flag or the file)."""
    if not isinstance(name, str) or name not in NAMES:
        raise InputError(where, f"sampler {name!r} is not one of {', '.join(NAMES)}")
    return name


def auto_row(trials: int) -> AutoRow:
    return next(row for row in AUTO if row.holds(trials))


def resolve(
    flag: str | None, space_value: str | None, space_path: str | Path, trials: int, concurrent: int
) -> SamplerChoice:
    """The sampler of a search of `trials` trials, up to `concurrent` at once: `flag`
    (--sampler) wins over the space file's `sampler:`, and `auto` (also when neither is given)
    reads `AUTO`. An unknown name raises InputError naming the flag or the file."""
    if flag is not None:
        requested, source = check_name(flag, "--sampler"), "--sampler"
    elif space_value is not None:
        requested, source = check_name(space_value, space_path), f"{Path(space_path).name} (sampler:)"
    else:
        requested, source = AUTO_NAME, "default"
    if requested == AUTO_NAME:
        row = auto_row(trials)
        name = row.sampler
        if row.evidence == NOT_MEASURED:
            reason = f"auto: no model-based sampler has beaten random search on the bench at {trials} trials yet"
        else:
            reason = f"auto at {trials} trials: {row.evidence}"
        reason += f" ({BENCH_DOC})"
    else:
        name, reason = requested, f"set by {source}"
    return SamplerChoice(name, requested, source, reason, REGISTRY[name].settings(trials, concurrent))


def describe(choice: SamplerChoice, conditional: list[str]) -> str:
    """The settings in words, for the plan; `conditional`: the space's `when:` parameters."""
    s = choice.settings
    if choice.name == "tpe":
        liar = ", constant liar" if s["constant_liar"] else ""
        return f"multivariate, grouped{liar}, {s['n_startup_trials']} random startup trials"
    if choice.name == "gp":
        drawn = f"; {', '.join(conditional)} drawn at random (conditional)" if conditional else ""
        return f"{s['n_startup_trials']} random startup trials{drawn}"
    return "every trial drawn at random (the defaults' first)"


def missing_packages(choice: SamplerChoice) -> list[str]:
    """The packages `choice` needs that are not installed (found, not imported)."""
    return [p for p in REGISTRY[choice.name].needs if importlib.util.find_spec(p) is None]


def build(choice: SamplerChoice, seed: int) -> Any:
    """The Optuna sampler of `choice`, seeded. `group=True` is experimental in Optuna 5.1: its
    warning on construction is silenced here (pinned in requirements.lock; the test of each
    builder checks the settings reach the sampler)."""
    import optuna

    cls = getattr(optuna.samplers, REGISTRY[choice.name].optuna_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(seed=seed, **choice.settings)
