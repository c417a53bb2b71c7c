"""What `run_search.py` and `run_ensemble.py` print: Ray's trial status table, one line per
finished trial (`tune/progress.py`), the scripts' own tables, warnings and errors; not Ray's
per-worker chatter, which stays in the session's log files (`/tmp/ray/session_latest/logs`).

Where the chatter came from (Ray 2.60) and the public switch that silences each:

- every Train worker's `Reporting training result ...: TrainingReport(...)` and `Checkpoint
  successfully created`, the TrainController's worker-group lines, the `PreemptionWatcher` and
  `PlacementGroupCleaner` actors' lines, Ray Data actors' output: output of worker processes,
  forwarded to the driver -> `ray.init(log_to_driver=False)`. (The TrainingReport logger is named
  after its file, so neither `ray.train.LoggingConfig` nor the `ray` logger level reaches it.)
  A failing trial still shows its traceback: Tune logs it from the driver (`Trial task failed`),
  and a Ray Data actor's error is raised in the driver;
- `Started a local Ray instance` and Tune's INFO lines: the driver's `ray` logger ->
  `ray.init(logging_level=WARNING)`;
- Tune's experiment box and every trial's config and result tables: the new output engine prints
  them at any verbosity above 0 -> `RAY_AIR_NEW_OUTPUT=0`, whose `RunConfig(verbose=1,
  progress_reporter=CLIReporter(...))` prints only the status table (`tune/progress.py`);
- Optuna's `A new study created` -> `optuna.logging.set_verbosity(WARNING)`;
- Ray Data's `Starting execution` / `Execution plan` -> `DataContext.print_on_execution_start`
  (set by `ray_env.init`, which calls `setup`);
  its progress, logged line by line when stdout is not a terminal, and `execution finished` ->
  the `ray.data` logger at WARNING (a terminal still gets its progress bar);
- rasterio's `NotGeoreferencedWarning` (the challenge's tiles carry no georeference): `data.io`
  ignores it inside `warnings.catch_warnings`, which is not thread-safe, so the submission
  check's reader threads still leak it -> a process-wide warnings filter.

Left: one `core_worker.cc ... has constructor arguments in the object store and max_restarts > 0`
line when the ensemble's first Ray Data actor starts. The driver's C++ core worker logs it at
ERROR level; only `RAY_BACKEND_LOG_LEVEL=fatal` (which hides real core errors too) or
`map_batches(max_restarts=0)` (no actor fault tolerance) would remove it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

LEGACY_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


def setup(verbose: bool = False) -> dict[str, Any]:
    """Quiet this process's console before Ray starts; returns the `ray.init` keyword arguments
    that go with it. `verbose` keeps Ray's full output (every worker's lines) for debugging."""
    if verbose:
        return {"log_to_driver": True}
    os.environ[LEGACY_OUTPUT_ENV] = "0"  # read when a Tuner fits: the engine whose verbose=1 is terse
    import optuna
    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # again after its import: ray_env.init
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def duration(seconds: float) -> str:
    """A wall time as a person reads it in a plan: `45 s`, `12 min`, `3.5 h`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 120 * 60 else f"{seconds / 3600:.1f} h"


def quiet() -> bool:
    """True when `setup` quieted this process (Tuners then get the terse status table)."""
    return os.environ.get(LEGACY_OUTPUT_ENV) == "0"


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """Raise one library logger to `level` for the duration, then restore it: for a notice a
    library logs on a path where we know it is expected (and say why at the call)."""
    target = logging.getLogger(name)
    before = target.level
    target.setLevel(level)
    try:
        yield
    finally:
        target.setLevel(before)
