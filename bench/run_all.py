"""Run every benchmark and rewrite the CPU rows of docs/BENCHMARKS.md with the figures.

    flock /tmp/geopose_ray.lock python bench/run_all.py --quick     # < 15 min on 2 cores

Each bench runs as its own process (a fresh Ray instance, torch threads and memory each); their
JSON lines are passed through to stdout, their logs go to <work>/logs/<bench>.log. A bench that
fails gets a row saying so (and the run's exit code is 1); the others still run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from geopose_ray.errors import InputError, run_cli

BENCHES = ("loader", "ray_overhead", "asha", "inference", "precision", "concurrency")
ISSUE_ITEM = {"loader": 1, "ray_overhead": 2, "asha": 3, "inference": 4, "precision": 5, "concurrency": 6}
DOC = common.REPO / "docs" / "BENCHMARKS.md"
MACHINE_MARKERS = ("<!-- cpu-machine:start -->", "<!-- cpu-machine:end -->")
ROWS_MARKERS = ("<!-- cpu-rows:start -->", "<!-- cpu-rows:end -->")
# details shown in the table, per result (the JSON lines hold everything)
SHOWN = {
    "loader": ("cache_crops_per_s", "j2k_crops_per_s", "item_ratio", "identical", "tile", "crop"),
    "ray_overhead": ("bare_s", "epochs", "in_loop_s", "startup_s", "ray_init_s", "teardown_s", "ratio_total"),
    "asha": ("epochs_asha", "epochs_full", "best_asha", "best_full", "same_best_trial", "same_configs",
             "wall_asha_s", "wall_full_s", "min_possible_ratio"),
    "inference": ("batched_s_per_tile", "per_view_s_per_tile", "tile_px", "encoder", "max_abs_diff_m"),
    "precision": ("imgs_per_s", "fp32_imgs_per_s", "encoder", "crop_px", "batch"),
    "concurrency": ("trials_per_h_c1", "trials_per_h_c2", "train_share_c1", "train_share_c2",
                    "cpu_busy_c1", "cpu_busy_c2", "peak_mem_gib_c2", "limit"),
}  # fmt: skip


def run_bench(name: str, quick: bool, work: Path, log_dir: Path) -> tuple[list[dict[str, Any]], float]:
    """Run bench/<name>.py in a child process; (its JSON results, wall seconds). A failed bench
    yields one result with `error` set."""
    cmd = [sys.executable, str(Path(__file__).with_name(f"{name}.py")), "--work", str(work)]
    cmd += ["--quick"] if quick else []
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    wall = time.perf_counter() - t0
    results = parse_results(proc.stdout)
    for r in results:
        print(json.dumps(r), flush=True)
    if proc.returncode != 0 or not results:
        failed = {"bench": name, "ratio": math.nan, "error": f"exit code {proc.returncode}, log {log}"}
        print(json.dumps(failed), flush=True)
        results.append(failed)
    return results, wall


def parse_results(stdout: str) -> list[dict[str, Any]]:
    """The JSON result lines of a bench's stdout (anything else there is ignored)."""
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict) and "bench" in doc:
                out.append(doc)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else "n/a"
    return str(value)


def render_rows(results: list[dict[str, Any]], seconds: dict[str, float]) -> str:
    """Markdown table rows, one per result: item, bench, ratio, goal, met, shown details, bench wall."""
    rows = []
    for r in results:
        family = next((b for b in BENCHES if r["bench"].startswith(b)), r["bench"])
        if "error" in r:
            rows.append(f"| {ISSUE_ITEM.get(family, '')} | {r['bench']} | failed | | | {r['error']} | |")
            continue
        met = {True: "**met**", False: "**missed**", None: "-"}[r.get("goal_met")]
        details = ", ".join(f"{k} {_fmt(r[k])}" for k in (*SHOWN.get(family, ()), "load_1m") if k in r)
        wall = seconds.get(family, math.nan)
        rows.append(
            f"| {ISSUE_ITEM.get(family, '')} | {r['bench']} | {_fmt(r.get('ratio'))} | {r.get('goal', '')} "
            f"| {met} | {details} | {wall:.0f} |"
        )
    return "\n".join(rows)


def render_machine(before: dict[str, Any], load_after: float, total_s: float, command: str) -> str:
    return "\n".join([
        f"- machine: {before['cpu']}, {before['cores']} cores, {before['ram_gib']} GiB RAM, "
        f"accelerator: {before['accelerator']}; torch {before['torch']}, Python {before['python']}",
        f"- date: {before['date']}",
        f"- command: `{command}`",
        f"- load average (1 min, shared machine) before / after: {before['load_1m']} / {load_after:.2f}; "
        f"total wall time {total_s / 60:.1f} min",
    ])  # fmt: skip


def replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    """`text` with the part between the two marker lines replaced by `body`."""
    start, end = markers
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"markers {start} ... {end} not found")
    return text[: i + len(start)] + "\n" + body + "\n" + text[j:]


def rewrite_doc(doc: Path, machine_md: str, rows_md: str) -> None:
    """Replace the machine block and the CPU rows of the benchmarks doc; the rest stays."""
    from geopose_ray.atomic import atomic_write_text

    if not doc.is_file():
        raise InputError(doc, "benchmarks doc not found")
    try:
        text = replace_between(doc.read_text(), MACHINE_MARKERS, machine_md)
        text = replace_between(text, ROWS_MARKERS, rows_md)
    except ValueError as e:
        raise InputError(doc, str(e)) from None
    atomic_write_text(doc, text)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated benches (default: all); the doc is then left alone")
    p.add_argument("--doc", type=Path, default=DOC, help="doc whose CPU rows are rewritten")
    p.add_argument("--no-doc", action="store_true", help="print only, leave the doc alone")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        raise InputError("--only", f"unknown bench(es) {unknown}; known: {list(BENCHES)}")
    write_doc = not args.no_doc and not args.only
    if write_doc and not args.doc.is_file():
        raise InputError(args.doc, "benchmarks doc not found")
    work = common.work_dir(args.work)
    (work / "logs").mkdir(exist_ok=True)
    before, t0 = common.machine(), time.perf_counter()
    results, seconds = [], {}
    for name in names:
        res, seconds[name] = run_bench(name, args.quick, work, work / "logs")
        results += res
    total = time.perf_counter() - t0
    print(f"run_all: {len(names)} benches in {total / 60:.1f} min", file=sys.stderr)
    if write_doc:
        command = "flock /tmp/geopose_ray.lock python bench/run_all.py" + (" --quick" if args.quick else "")
        machine_md = render_machine(before, os.getloadavg()[0], total, command)
        rewrite_doc(args.doc, machine_md, render_rows(results, seconds))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    run_cli(main)
