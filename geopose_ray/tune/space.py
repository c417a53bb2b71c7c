"""Search spaces as data: load and validate a `search_spaces/*.yaml` file, and turn it into an
Optuna define-by-run function (conditional parameters) plus the defaults that seed the search.

The file format is documented in `search_spaces/README.md`. Every key is a flat `Config` key, so a
typo fails when the file is loaded, not hours into a search.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from geopose_ray.config import Config, key_owners
from geopose_ray.data import derive
from geopose_ray.data.stats import DataStats
from geopose_ray.errors import InputError
from geopose_ray.experiment import RUN_KEYS
from geopose_ray.tune.sampler import check_name
from geopose_ray.yamlio import read_yaml_mapping

TYPES = ("choice", "uniform", "loguniform", "int")
TOP_KEYS = {"description", "parameters", "fixed", "scheduler", "num_samples", "resources", "sampler"}
PARAM_KEYS = {"type", "values", "low", "high", "step", "log", "default", "when"}
SCHEDULER_KEYS = {"max_epochs", "grace_period", "reduction_factor", "after_signal"}
RESOURCE_KEYS = {"workers_per_trial", "cpus_per_worker", "gpus_per_worker"}
# Set by the run itself (CLI flags / scheduler), never by a space file.
SET_BY_RUN = {*RUN_KEYS, "epochs"}  # a space may not fix these: the command line and scheduler do


@dataclass(frozen=True)
class Param:
    """One searched parameter; `when` maps earlier parameter (or fixed) names to allowed values."""

    name: str
    type: str
    default: Any
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, chosen: dict[str, Any]) -> bool:
        """True when every condition holds for the values chosen so far."""
        return all(key in chosen and chosen[key] in allowed for key, allowed in self.when)

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial (or Ray's captor of one) for this parameter's value."""
        if self.type == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.type == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        log = self.log or self.type == "loguniform"
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=log)

    def distribution(self) -> Any:
        """The matching optuna distribution (to rebuild a study from finished trials)."""
        import optuna.distributions as od

        if self.type == "choice":
            return od.CategoricalDistribution(list(self.values))
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return od.FloatDistribution(
            self.low, self.high, step=self.step, log=self.log or self.type == "loguniform"
        )


@dataclass(frozen=True)
class Scheduler:
    """ASHA settings; `max_epochs` is also every trial's `epochs` (the full budget)."""

    max_epochs: int
    grace_period: int = 1
    reduction_factor: float = 2.0
    after_signal: bool = True  # cut only once a trial shows every target learning (signal.py)


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    name: str
    parameters: tuple[Param, ...]
    fixed: dict[str, Any]
    scheduler: Scheduler
    num_samples: int
    resources: dict[str, float] = field(default_factory=dict)
    description: str = ""
    sampler: str | None = None  # the file's `sampler:` (tune/sampler.py); None: not set, auto

    def conditional(self) -> list[str]:
        """The parameters some trials do not have (`when:`)."""
        return [p.name for p in self.parameters if p.when]

    def sample(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run body: conditionals in file order; returns the fixed settings."""
        chosen: dict[str, Any] = dict(self.fixed)
        for p in self.parameters:
            if p.active(chosen):
                chosen[p.name] = p.suggest(trial)
        return {**self.fixed, "epochs": self.scheduler.max_epochs}

    def default_point(self) -> dict[str, Any]:
        """The searched parameters' defaults that are active under the defaults (points_to_evaluate)."""
        chosen: dict[str, Any] = dict(self.fixed)
        point: dict[str, Any] = {}
        for p in self.parameters:
            if p.active(chosen):
                chosen[p.name] = point[p.name] = p.default
        return point

    def defaults(self) -> dict[str, Any]:
        """Flat config of the default trial: fixed settings + active defaults + epochs."""
        return {**self.fixed, **self.default_point(), "epochs": self.scheduler.max_epochs}

    def searched(self) -> list[str]:
        return [p.name for p in self.parameters]

    def values_of(self, key: str) -> list[Any]:
        """Every value a trial's `key` can take: the fixed one, a choice's values, or the Config
        default; [] for a continuous range."""
        if key in self.fixed:
            return [self.fixed[key]]
        param = next((p for p in self.parameters if p.name == key), None)
        if param is None:
            return [self.default_config().to_dict()[key]]
        return list(param.values) if param.type == "choice" else []

    def default_config(self) -> Config:
        """The Config of the default trial (keys the space leaves out at Config's defaults)."""
        return Config.from_dict(self.defaults(), strict=False)

    def n_folds(self) -> int:
        """The folds the space's data is split into (a fixed key, else Config's default)."""
        return self.default_config().data.n_folds

    def remeasure_every(self) -> int:
        """Epochs between the BatchNorm re-measures the rungs read (`precise_bn_every`, set by the
        run from the grace period: `tune.options.resolve_space`); 0 before that, or with no rungs."""
        return int(self.fixed.get("precise_bn_every", 0) or 0)

    def with_fixed(self, overrides: dict[str, Any], source: str = "--set") -> SearchSpace:
        """The space with more fixed settings (`run_search.py --set KEY=VALUE`): Config keys that
        the space does not search and the run does not set; the defaults must still build."""
        for key in overrides:
            _config_key(Path(source), key, "key")
            if key in self.searched():
                raise InputError(source, f"'{key}' is searched by {self.path}: edit its range there")
        space = dataclasses.replace(self, fixed={**self.fixed, **overrides})
        try:
            Config.from_dict(space.defaults())
        except (TypeError, ValueError) as e:
            raise InputError(source, f"the defaults no longer build a valid Config: {e}") from None
        return space


    def with_data(self, data: DataStats) -> tuple[SearchSpace, list[str]]:
        """The space with the defaults derived from the data (`data.derive`) fixed where the space
        neither fixes nor searches them, its budget scaled to its crop (`derive.trial_epochs`), and
        the plan's line for each derived key. Where the batch
        is derived, the searched learning rate's default follows it (`derive.lr_factor`): a
        space's rate is for a batch of `derive.LR_REF_BATCH`; one that sets its batch keeps it."""
        fixed, lines = derive.apply(self.fixed, self.searched(), derive.derive(data, self.fixed))
        space = dataclasses.replace(self, fixed=fixed)
        if isinstance(fixed.get("crop"), int):  # the budget follows the crop (derive.trial_epochs)
            sched = self.scheduler
            budget, grace = derive.trial_epochs(
                sched.max_epochs, sched.grace_period, fixed["crop"], int(fixed.get("epoch_samples", 0))
            )
            space = dataclasses.replace(
                space, scheduler=dataclasses.replace(sched, max_epochs=budget.value, grace_period=grace)
            )
            lines.append(f"{'max_epochs':<16} {budget.value!s:<6} {budget.reason}")
        lr = next((p for p in self.parameters if p.name == "lr" and p.low is not None), None)
        if lr is None or "batch_size" in self.fixed or "batch_size" in self.searched():
            return space, lines
        batch = int(fixed["batch_size"])
        default = float(min(max(lr.default * derive.lr_factor(batch), lr.low), lr.high))
        params = tuple(dataclasses.replace(p, default=default) if p is lr else p for p in self.parameters)
        why = f"the space's {lr.default:g} x sqrt(batch {batch} / {derive.LR_REF_BATCH}), Adam's square-root rule"
        return dataclasses.replace(space, parameters=params), [*lines, f"{'lr':<16} {default:<6.2g} searched; default: {why}"]


class SpaceSampler:
    """Picklable define-by-run callable for `OptunaSearch(space=...)` (no computation inside)."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        return self.space.sample(trial)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs -> {KEY: VALUE parsed as YAML}; see `SearchSpace.with_fixed`."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError("--set", f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InputError("--set", f"{key}: VALUE is not valid YAML: {value!r}") from None
    return out


def is_space_file(path: str | Path) -> bool:
    """True for a search-space YAML (it has `parameters:` or `fixed:`), not a flat config file."""
    try:
        doc = read_yaml_mapping(path, "search space", "not a mapping")
    except InputError:
        return False  # whoever reads it next reports the problem
    return "parameters" in doc or "fixed" in doc


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML; any problem raises InputError naming the file."""
    path = Path(path)
    doc = read_yaml_mapping(
        path, "search space", "a search space must be a mapping with a 'parameters:' section"
    )
    _check_keys(path, "top level", doc, TOP_KEYS)
    fixed = _fixed(path, doc.get("fixed") or {})
    params = _parameters(path, doc.get("parameters") or {}, fixed)
    space = SearchSpace(
        path=path,
        name=path.stem,
        parameters=params,
        fixed=fixed,
        scheduler=_scheduler(path, doc.get("scheduler") or {}),
        num_samples=_positive_int(path, "num_samples", doc.get("num_samples", 1)),
        resources=_resources(path, doc.get("resources") or {}),
        description=str(doc.get("description", "")),
        sampler=check_name(doc["sampler"], path) if "sampler" in doc else None,
    )
    try:
        Config.from_dict(space.defaults())
    except (TypeError, ValueError) as e:
        raise InputError(path, f"defaults do not build a valid Config: {e}") from None
    return space


def _check_keys(path: Path, where: str, mapping: Any, allowed: set[str]) -> None:
    if not isinstance(mapping, dict):
        raise InputError(path, f"{where} must be a mapping")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise InputError(path, f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def _config_key(path: Path, key: str, where: str) -> None:
    if key not in key_owners():
        raise InputError(path, f"{where} '{key}' is not a Config key")
    if key in SET_BY_RUN:
        hint = {"epochs": "scheduler.max_epochs", "precise_bn_every": "scheduler.grace_period"}.get(key, "the command line")
        raise InputError(path, f"{where} '{key}' is set by the run; use {hint}")


def _fixed(path: Path, fixed: Any) -> dict[str, Any]:
    _check_keys(path, "fixed", fixed, set(fixed) if isinstance(fixed, dict) else set())
    for key in fixed:
        _config_key(path, key, "fixed key")
    return dict(fixed)


def _parameters(path: Path, raw: Any, fixed: dict[str, Any]) -> tuple[Param, ...]:
    _check_keys(path, "parameters", raw, set(raw) if isinstance(raw, dict) else set())
    params: list[Param] = []
    for name, spec in raw.items():
        where = f"parameter '{name}'"
        _config_key(path, name, "parameter")
        if name in fixed:
            raise InputError(path, f"{where} is also in fixed")
        _check_keys(path, where, spec, PARAM_KEYS)
        params.append(_param(path, name, spec, {p.name: p for p in params}, fixed))
    return tuple(params)


def _param(path: Path, name: str, spec: dict, earlier: dict[str, Param], fixed: dict[str, Any]) -> Param:
    where = f"parameter '{name}'"
    kind = spec.get("type")
    if kind not in TYPES:
        raise InputError(path, f"{where}: type must be one of {list(TYPES)}, not {kind!r}")
    if "default" not in spec:
        raise InputError(path, f"{where}: missing 'default' (the defaults form the first trial)")
    p = Param(
        name=name,
        type=kind,
        default=spec["default"],
        values=tuple(spec.get("values") or ()),
        low=_number(path, where, spec, "low", kind != "choice"),
        high=_number(path, where, spec, "high", kind != "choice"),
        step=_number(path, where, spec, "step", False),
        log=bool(spec.get("log", False)),
        when=_when(path, where, spec.get("when") or {}, earlier, fixed),
    )
    _check_range(path, where, p)
    return p


def _number(path: Path, where: str, spec: dict, key: str, required: bool) -> float | None:
    if key not in spec:
        if required:
            raise InputError(path, f"{where}: missing '{key}'")
        return None
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(path, f"{where}: '{key}' must be a finite number, not {value!r}")
    return value


def _check_range(path: Path, where: str, p: Param) -> None:
    if p.type == "choice":
        if not p.values:
            raise InputError(path, f"{where}: a choice needs a non-empty 'values' list")
        if p.default not in p.values:
            raise InputError(path, f"{where}: default {p.default!r} is not one of {list(p.values)}")
        return
    if p.values:
        raise InputError(path, f"{where}: 'values' is only for type choice")
    if not p.low < p.high:
        raise InputError(path, f"{where}: needs low < high (got {p.low}, {p.high})")
    if (p.log or p.type == "loguniform") and p.low <= 0:
        raise InputError(path, f"{where}: a log scale needs low > 0")
    if p.type == "int" and not all(float(v).is_integer() for v in (p.low, p.high, p.step or 1)):
        raise InputError(path, f"{where}: int bounds and step must be integers")
    ok_type = isinstance(p.default, (int, float)) and not isinstance(p.default, bool)
    if not ok_type or not p.low <= p.default <= p.high:
        raise InputError(path, f"{where}: default {p.default!r} is outside [{p.low}, {p.high}]")
    if p.type == "int" and not float(p.default).is_integer():
        raise InputError(path, f"{where}: default {p.default!r} is not an integer")


def _when(
    path: Path, where: str, when: Any, earlier: dict[str, Param], fixed: dict[str, Any]
) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    _check_keys(path, f"{where} when", when, set(earlier) | set(fixed))
    out = []
    for key, allowed in when.items():
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        ref = earlier.get(key)
        if ref is not None and ref.type == "choice":
            bad = [v for v in allowed if v not in ref.values]
            if bad:
                raise InputError(path, f"{where}: when {key} in {bad}, but {key} never takes those values")
        out.append((key, allowed))
    return tuple(out)


def _scheduler(path: Path, raw: Any) -> Scheduler:
    _check_keys(path, "scheduler", raw, SCHEDULER_KEYS)
    if "max_epochs" not in raw:
        raise InputError(path, "scheduler: missing 'max_epochs' (every trial's full budget)")
    sched = Scheduler(
        max_epochs=_positive_int(path, "scheduler.max_epochs", raw["max_epochs"]),
        grace_period=_positive_int(path, "scheduler.grace_period", raw.get("grace_period", 1)),
        reduction_factor=float(raw.get("reduction_factor", 2)),
        after_signal=raw.get("after_signal", True),
    )
    if not isinstance(sched.after_signal, bool):
        raise InputError(path, f"scheduler.after_signal must be true or false, not {sched.after_signal!r}")
    if sched.grace_period > sched.max_epochs or sched.reduction_factor <= 1:
        raise InputError(path, "scheduler: needs grace_period <= max_epochs and reduction_factor > 1")
    return sched


def _resources(path: Path, raw: Any) -> dict[str, float]:
    _check_keys(path, "resources", raw, RESOURCE_KEYS)
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise InputError(path, f"resources.{key} must be a number >= 0, not {value!r}")
    return dict(raw)


def _positive_int(path: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(path, f"{key} must be a positive integer, not {value!r}")
    return value
