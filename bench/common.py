"""What every benchmark shares: the command line, one JSON line per result, the machine record,
a local Ray instance, derived search spaces and the bench's own synthetic data sets.

Benchmarks measure ratios side by side (A and B on the same machine, minutes apart), because
absolute times on a shared 2-core box move by 2-5x from run to run (docs/LIBRARIES.md, 'CPU training speed and autocast').
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from geopose_ray import paths

REPO = Path(__file__).resolve().parents[1]
SMOKE_SPACE = REPO / "search_spaces" / "smoke.yaml"
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # token auth breaks local clusters (docs/LIBRARIES.md, 'Ray: environment')
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "HF_HUB_OFFLINE": "1",
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
}


def parser(description: str) -> argparse.ArgumentParser:
    """The options every bench takes: --quick (the run_all budget) and --work (its scratch folder)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: the whole suite in < 15 min on 2 cores")
    p.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: <GEOPOSE_RAY_HOME>/bench)"
    )
    return p


def work_dir(work: Path | None) -> Path:
    """The bench scratch folder (data sets are generated there once and reused)."""
    out = Path(work) if work is not None else paths.home() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def sig(x: Any, digits: int = 4) -> Any:
    """Round floats to `digits` significant digits (JSON stays readable); others unchanged."""
    if isinstance(x, float) and math.isfinite(x) and x != 0.0:
        return round(x, digits - 1 - math.floor(math.log10(abs(x))))
    if isinstance(x, dict):
        return {k: sig(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [sig(v, digits) for v in x]
    return x


def emit(bench: str, ratio: float, **details: Any) -> dict[str, Any]:
    """Print one result as a JSON line (`{"bench": ..., "ratio": ..., ...details}`) and return it.
    `load_1m` (the machine's load average as the result is printed) is added unless given."""
    record = sig({"bench": bench, "ratio": float(ratio), **details})
    record.setdefault("load_1m", round(os.getloadavg()[0], 2))
    print(json.dumps(record, default=str), flush=True)
    return record


def goal_met(value: float, op: str, target: float) -> bool | None:
    """`value op target` for op in (">=", "<="); None when the value is not a number."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value >= target if op == ">=" else value <= target


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, RAM, accelerator, load, date."""
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib("MemTotal") / 2**20, 1),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_1m": round(os.getloadavg()[0], 2),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def mem_kib(key: str) -> float:
    """A /proc/meminfo field in KiB (NaN where there is no /proc)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return float(line.split()[1])
    return math.nan


def synthetic_set(work: Path, size: int, per_city: int, test_per_city: int = 0) -> Path:
    """A synthetic DrivenData-layout set in the bench folder (generated once, then reused)."""
    from geopose_ray.synthetic import generate

    out = work / f"synthetic_{size}px_{per_city}_{test_per_city}"
    return generate(out, size=size, per_city=per_city, test_per_city=test_per_city, seed=0)


def derived_space(out: Path, base: Path = SMOKE_SPACE, **changes: Any) -> Path:
    """Write a copy of a search-space YAML with top-level sections changed: `scheduler`, `fixed`
    and `resources` are merged key by key, anything else replaced. Validated by load_space."""
    from geopose_ray.tune.space import load_space

    doc = yaml.safe_load(Path(base).read_text())
    for key, value in changes.items():
        if key in ("scheduler", "fixed", "resources"):
            doc[key] = {**(doc.get(key) or {}), **value}
        else:
            doc[key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    load_space(out)
    return out


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None) -> Iterator[float]:
    """A fresh local Ray instance (dashboard on: ASHA stops need the State API, docs/LIBRARIES.md, 'Ray: environment');
    yields the seconds `ray.init` took. The caller holds /tmp/geopose_ray.lock (run under flock).

    Its address is pinned before it starts, as run_search does (`ray_env.pin_local_address`:
    Train's placement-group cleaner otherwise fails when another Ray instance runs on the
    machine), and the environment is restored afterwards. PYTHONPATH gets
    the repository (Ray workers import the bench's worker wrappers); Tune's progress tables go to
    stderr, so stdout holds only the JSON result lines."""
    import ray

    from geopose_ray.ray_env import pin_local_address

    env = {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}  # the user's settings win
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    saved = {k: os.environ.get(k) for k in (*env, "RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ.update(env)
    try:
        pin_local_address()
        with contextlib.redirect_stdout(sys.stderr):
            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                     log_to_driver=False)  # fmt: skip
            try:
                yield time.perf_counter() - t0
            finally:
                ray.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
