"""What an experiment is, and what made it: the fingerprint that keeps two experiments of one
`--name` apart, and the record every experiment keeps in its options file
(`search_options.json`). No `ray`.

The fingerprint hashes what decides which trials are comparable: the data folder, the space
file's content with the --set values, the fold record and the defaults derived from the data.
It names the Optuna study in a shared `--optuna-storage` database (`options.optuna_study`), so
an experiment on another data set never adds its trials to another's study; and `--resume`
against another fingerprint stops with exit 2 (`check_resumable`).

The sampler (`sampler.py`) is not in the fingerprint: it decides which configs are proposed, not
whether two trials are comparable. But Tune restores a resumed search's searcher, sampler and
all, from the experiment's state, so a --resume that asks for another sampler than the options
file records would be silently ignored: it stops with exit 2 too. An experiment made before the
options file recorded a sampler ran Optuna's TPE: it resumes with `--sampler tpe` (its pickled
`TPESampler(seed)`, whatever the flag's settings).

The record: the resolved options (every URL masked, `redact.py`), the sampler and why, the
resources, the fixed keys, the fold record, the derived values with the reason for each, the
fingerprint and study, and the code and environment that ran: the git commit and the sha256 of
`requirements.lock`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geopose_ray.atomic import atomic_write_text
from geopose_ray.data.stats import DataStats
from geopose_ray.errors import InputError
from geopose_ray.experiment import OPTIONS, Experiment
from geopose_ray.redact import mask_url
from geopose_ray.tune.capacity import TrialResources
from geopose_ray.tune.options import SearchOptions, load_run_space, optuna_study, resolve_sampler
from geopose_ray.tune.space import SearchSpace

FOLDS_VERSION = 2  # 1: city folds by default, one place's tiles in several folds; 2: place folds
FINGERPRINT_CHARS = 16  # of the sha256; the study name takes the first 8
REPO = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO / "requirements.lock"
UNKNOWN = "unknown"
LEGACY_SAMPLER = "tpe"  # every search before options files recorded a sampler: TPESampler(seed)


@dataclass(frozen=True)
class Identity:
    """An experiment's fingerprint and the values it was computed from."""

    fingerprint: str
    folds: dict[str, Any]
    derived: dict[str, Any] = field(default_factory=dict)  # key -> the value derived from the data
    derived_lines: list[str] = field(default_factory=list)  # the plan's line per key, with its reason


def folds_record(space: SearchSpace) -> dict[str, Any]:
    """The fold settings every trial, refit and blend of the experiment shares, with the version
    of their meaning: an experiment is resumed only with the folds it started with."""
    from geopose_ray.config import Config

    d = Config.from_dict(space.defaults(), strict=False).data
    return {"version": FOLDS_VERSION, "mode": d.fold_mode, "n_folds": d.n_folds, "fold_seed": d.fold_seed}


def identify(opts: SearchOptions, data_dir: str | Path, measured: DataStats | None) -> Identity:
    """The experiment's identity on this data: `measured` (the data's statistics) gives the
    derived defaults; None (the embedded set not written yet) leaves them out."""
    space = load_run_space(opts)
    derived_space, lines = space.with_data(measured) if measured is not None else (space, [])
    derived = {k: v for k, v in derived_space.fixed.items() if k not in space.fixed}
    folds = folds_record(derived_space)
    content = hashlib.sha256(Path(space.path).read_bytes()).hexdigest()
    parts = {
        "data_dir": str(Path(data_dir).resolve()),
        "space": content,
        "overrides": opts.overrides,
        "folds": folds,
        "derived": derived,
    }
    if derived_space.scheduler != space.scheduler:  # the budget scaled to the crop (derive.trial_epochs)
        parts["budget"] = [derived_space.scheduler.max_epochs, derived_space.scheduler.grace_period]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return Identity(digest[:FINGERPRINT_CHARS], folds, derived, lines)


def check_resumable(
    exp: Experiment, space: SearchSpace, fingerprint: str | None = None, sampler: str | None = None
) -> None:
    """A resumed experiment must have started with these folds and (given a `fingerprint`) on
    the same data, space and derived defaults: trials split or made another way would be ranked,
    refit and blended as if they were comparable. One that started before place folds (no
    record), with other fold settings or with another fingerprint stops with one line (exit 2);
    so does one whose recorded sampler is not `sampler` (the name a resume resolves to)."""
    local = exp.fetch(OPTIONS)
    stored = json.loads(local.read_text()) if local is not None else {}
    folds = stored.get("folds")
    if folds != folds_record(space):
        problem = "made before leak-free place folds" if folds is None else f"made with folds {folds}"
        raise InputError(exp.location, f"{problem}, not {folds_record(space)}: start a new --name")
    if fingerprint is not None and stored.get("fingerprint") != fingerprint:
        was = stored.get("fingerprint") or "none (made before fingerprints)"
        raise InputError(
            exp.location,
            f"made with fingerprint {was}, not {fingerprint} (another data folder, space, --set, folds or "
            "derived defaults): resume with the same ones, or start a new --name",
        )
    record = stored.get("sampler")
    was = record.get("name") if isinstance(record, dict) else LEGACY_SAMPLER
    if sampler is not None and was != sampler:
        made = "made before samplers were recorded (with TPE)" if record is None else f"made with the {was} sampler"
        raise InputError(
            exp.location,
            f"{made}, not {sampler}: a resumed search keeps the sampler it started with; "
            f"resume with --sampler {was}, or start a new --name",
        )


def provenance() -> dict[str, Any]:
    """The code and environment that ran: the git commit ("unknown" outside a git checkout),
    whether the checkout had uncommitted changes, and the sha256 of requirements.lock."""
    commit, dirty = UNKNOWN, None
    if (REPO / ".git").exists():
        try:
            run = {"cwd": REPO, "capture_output": True, "text": True, "timeout": 10, "check": True}
            commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip() or UNKNOWN
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):  # no git on this machine
            commit, dirty = UNKNOWN, None
    lock = hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest() if LOCK_FILE.is_file() else UNKNOWN
    return {"git_commit": commit, "git_dirty": dirty, "requirements_lock_sha256": lock}


def options_doc(
    exp: Experiment, opts: SearchOptions, space: SearchSpace, res: TrialResources, conc: int, ident: Identity
) -> dict[str, Any]:
    """The options file's content: what exactly ran, for a later reader, with no secret in it."""
    doc = dataclasses.asdict(opts)
    doc.update({key: mask_url(doc[key]) for key in ("storage", "optuna_storage", "mlflow")})
    url, study = optuna_study(opts, exp, ident.fingerprint)
    doc.update(
        sampler=resolve_sampler(opts, space, conc).record(),  # the flag's value is its `requested`
        space_file=str(Path(space.path).resolve()),
        resources=dataclasses.asdict(res),
        max_concurrent_trials=conc,
        max_epochs=space.scheduler.max_epochs,
        fixed=space.fixed,
        folds=ident.folds,
        fold_mode=ident.folds["mode"],
        derived=ident.derived_lines,
        derived_keys=ident.derived,
        fingerprint=ident.fingerprint,
        optuna={"storage": mask_url(url), "study": study},
        provenance=provenance(),
    )
    return doc


def write_options(
    exp: Experiment, opts: SearchOptions, space: SearchSpace, res: TrialResources, conc: int, ident: Identity
) -> None:
    """The options file beside the results (`options_doc`)."""
    doc = options_doc(exp, opts, space, res, conc, ident)
    atomic_write_text(exp.options, json.dumps(doc, indent=2, default=str) + "\n")
