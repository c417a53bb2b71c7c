"""Does the search earn its compute? On held-out synthetic family sets, at equal CPU-seconds:
(a) `config`: the default config trained with the whole budget (k seeds, their D4 predictions
averaged by the ensemble job) against (b) `search`: the default search (`run_search.py`:
sampler, ASHA, refits; then `run_ensemble.py`); and (c) random search against a model-based
sampler at the same number of trials (`tpe`, `gp`, `random@24`, ...). Every arm is scored on
the test truth of places it never saw (`python -m geopose_ray.score`). docs/SEARCH_VALUE.md
names the sets, seeds and rules, fixed before any run.

    flock /tmp/geopose_ray.lock python bench/search_value.py                 # every set, seed 0,1,2
    flock /tmp/geopose_ray.lock python bench/search_value.py --arms random@24,tpe@24
    flock /tmp/geopose_ray.lock python bench/search_value.py --quick         # ~15 min: a smoke check
    python bench/search_value.py --dry-run [--quick]    # what would run, nothing run or written
    python bench/search_value.py --table [--results FILE]   # the markdown tables of docs/SEARCH_VALUE.md

One JSON line per (set, arm, seed) is appended to the results file (default
<work>/search_value/results.jsonl); a row already there is not run again, so an interrupted bench
resumes where it stopped. Arm (a) needs arm (b)'s row of the same set and seed: its epochs come
from (b)'s measured time (`config_epochs`). Hours of CPU: not part of CI or run_all.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench import common
from bench.search_value_table import render
from geopose_ray import paths
from geopose_ray.errors import InputError, run_cli
from geopose_ray.tune.options import validation_spacing
from geopose_ray.tune.sampler import REGISTRY

SETS = ("heldout-128-many", "heldout-384-views", "heldout-512-low")  # never the tune-* sets
SEEDS = (0, 1, 2)
ARMS = ("search", "config", "tpe", "gp")  # then `--arms random@24,tpe@24` for auto's 12-47 row
QUICK_SETS, QUICK_SEEDS, QUICK_ARMS = ("heldout-128-many",), (0,), ("search", "config")
QUICK_FLAGS = ("--num-samples", "3", "--max-epochs", "3")  # every search arm of --quick
CONFIG_SEEDS = 2  # k: arm (a)'s training seeds, as many members as the default search's refits
START_S = 15.0  # assumed start-up of one `python -m geopose_ray.train` process (imports, cache, model)
BENCH = "search_value"


@dataclass(frozen=True)
class Arm:
    label: str  # as given: search, config, tpe, gp, random@24, ...
    kind: str  # "search" (run_search.py + run_ensemble.py) or "config" (train.py x k + run_ensemble.py)
    sampler: str | None = None  # --sampler; None: the space's (auto)
    trials: int | None = None  # --num-samples; None: the space's


def parse_arm(text: str) -> Arm:
    """`config`, `search` (auto), a sampler name (`tpe`, `gp`, `random`), each but `config`
    optionally `@N` trials; anything else is an InputError naming --arms."""
    name, at, count = text.strip().partition("@")
    if name == "config" and not at:
        return Arm(text, "config")
    if name not in ("search", *REGISTRY) or (at and not count.isdigit()) or count == "0":
        raise InputError("--arms", f"{text!r}: expected config, search or one of {', '.join(REGISTRY)}, "
                         "optionally @TRIALS (e.g. tpe@24)")  # fmt: skip
    return Arm(text, "search", None if name == "search" else name, int(count) if at else None)


@dataclass
class Context:
    work: Path  # <work>/search_value: data sets, experiments, submissions, logs
    results: Path
    quick: bool
    cores: int  # what Ray and the training processes may use: CPU-seconds = wall x cores
    config_seeds: int = CONFIG_SEEDS

    def env(self) -> dict[str, str]:
        return {**common.RAY_ENV, **os.environ}

    def log(self, set_name: str, arm: Arm, seed: int, step: str) -> Path:
        path = self.work / "logs" / f"{set_name}_{slug(arm.label)}_s{seed}_{step}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def arm_dir(self, set_name: str, arm: Arm, seed: int) -> Path:
        return self.work / "runs" / ("quick" if self.quick else "full") / set_name / f"{slug(arm.label)}_s{seed}"


def slug(label: str) -> str:
    return label.replace("@", "_at_")


class StepFailed(RuntimeError):
    pass


def run_step(ctx: Context, cmd: list[str], log: Path) -> float:
    """Run `cmd` (output to `log`); its wall seconds. StepFailed naming the log on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=common.REPO, env=ctx.env(), check=False)
    if proc.returncode != 0:
        raise StepFailed(f"{Path(cmd[1]).name} exited {proc.returncode}: see {log}")
    return time.perf_counter() - t0


def run_parallel(ctx: Context, cmds: list[list[str]], logs: list[Path], at_once: int) -> float:
    """Run the commands, `at_once` at a time; wall seconds of the whole batch."""
    t0, running, pending = time.perf_counter(), [], list(zip(cmds, logs))
    while pending or running:
        while pending and len(running) < at_once:
            cmd, log = pending.pop(0)
            out = open(log, "w")  # noqa: SIM115 (closed when the process ends)
            running.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=common.REPO,
                                             env=ctx.env()), out, log))  # fmt: skip
        proc, out, log = running.pop(0)
        code = proc.wait()
        out.close()
        if code != 0:
            for other, handle, _ in running:
                other.wait()
                handle.close()
            raise StepFailed(f"train exited {code}: see {log}")
    return time.perf_counter() - t0


def data_set(ctx: Context, name: str, dry: bool = False) -> Path:
    """The family set `name`, written and converted once, outside any timed step."""
    out = ctx.work / "family" / name
    if dry:
        return out
    from geopose_ray.convert import ensure_cache, process_map
    from geopose_ray.synthetic.family import generate_named

    generate_named(name, out)
    ensure_cache(out, map_fn=process_map(), progress=False)
    return out


def search_cmd(ctx: Context, data: Path, arm: Arm, seed: int, storage: Path) -> list[str]:
    cmd = [sys.executable, "run_search.py", "--data", str(data), "--storage", str(storage), "--name", "search",
           "--seed", str(seed)]  # fmt: skip
    cmd += ["--sampler", arm.sampler] if arm.sampler else []
    cmd += list(QUICK_FLAGS) if ctx.quick else []
    if arm.trials:
        cmd = [*cmd, "--num-samples", str(arm.trials)]  # after QUICK_FLAGS: argparse keeps the last
    return cmd


def ensemble_cmd(data: Path, storage: Path, archive: Path, checkpoints: list[Path] | None = None) -> list[str]:
    members = ["--checkpoints", *map(str, checkpoints)] if checkpoints else ["--name", "search"]
    return [sys.executable, "run_ensemble.py", "--data", str(data), "--storage", str(storage), *members,
            "--tta", "d4", "--out", str(archive)]  # fmt: skip


def score(ctx: Context, data: Path, archive: Path) -> dict[str, Any]:
    """The official score of a submission on the set's test truth (the `score` command's JSON)."""
    cmd = [sys.executable, "-m", "geopose_ray.score", str(data / "truth"), str(archive)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO, env=ctx.env(), check=False)
    if out.returncode != 0:
        raise StepFailed(f"score exited {out.returncode}: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_epoch_s(experiment: Path, data: Path) -> float:
    """Wall seconds per epoch of the search's first trial (the space's defaults as the data
    derives them, e.g. the learning rate scaled to the derived batch: the config of arm (a)) on
    its own share of the cores: the mean `time_this_iter_s` after its first report (which holds
    the trial's start-up), so that its validations, every `val_every` epochs, count at their
    share. NaN when that trial is not found."""
    point = _derived_space(data).default_point()
    for result in sorted(experiment.glob("trial_*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        cfg = rows[0].get("config", {}) if rows else {}
        if rows and all(cfg.get(k) == v for k, v in point.items()) and len(rows) > 1:
            return statistics.fmean([r["time_this_iter_s"] for r in rows[1:]])
    return math.nan


def config_epochs(search_wall_s: float, epoch_s: float, seeds: int, cores: int) -> int:
    """Arm (a)'s epochs: the wall time arm (b) spent in run_search.py, on the same cores, spent
    on `seeds` training processes of the default config, `cores` at once (one thread each, as a
    trial), less START_S of start-up per wave. The ensemble steps cost alike on both sides."""
    waves = math.ceil(seeds / max(1, cores))
    return max(1, int((search_wall_s - waves * START_S) / (waves * epoch_s)))


def search_record(ctx: Context, data: Path, arm: Arm, seed: int, storage: Path, set_name: str) -> dict[str, Any]:
    """Arm (b) or (c): the search, its ensemble, the score, what it chose and cost."""
    archive = storage / "submission.tar.gz"
    t_search = run_step(ctx, search_cmd(ctx, data, arm, seed, storage), ctx.log(set_name, arm, seed, "search"))
    t_ens = run_step(ctx, ensemble_cmd(data, storage, archive), ctx.log(set_name, arm, seed, "ensemble"))
    options = json.loads((storage / "search" / "search_options.json").read_text())
    with open(storage / "search" / "leaderboard.csv", newline="") as f:
        best = next(csv.DictReader(f), {})  # best first, as report.py writes it
    return {
        "test": score(ctx, data, archive),
        "parts_s": {"search": t_search, "ensemble": t_ens},
        "sampler": options["sampler"]["name"],
        "sampler_reason": options["sampler"]["reason"],
        "trials": options["num_samples"] or _space_trials(),
        "best_val": float(best.get("score") or "nan"),
        "default_epoch_s": default_epoch_s(storage / "search", data),
    }


def _space_trials() -> int:
    from geopose_ray.tune.space import load_space

    return load_space(common.SMOKE_SPACE).num_samples


def _derived_space(data: Path) -> Any:
    """The default space with the values `data` derives (what run_search.py searches on it)."""
    from geopose_ray.data import cache, stats
    from geopose_ray.tune.space import load_space

    measured = stats.from_cache(cache.load_cache(paths.default_cache_dir(data), "train"))
    return load_space(common.SMOKE_SPACE).with_data(measured)[0]


def train_config_files(data: Path, seeds: list[int], epochs: int, out: Path) -> list[Path]:
    """One flat config per seed: the default search's default trial on `data` (its derived
    crop, batch and epoch size included), fold 0, `epochs` epochs, validated as the search's
    trials are (every grace period's epochs, and the last)."""
    space = _derived_space(data)
    flat = {**space.defaults(), **validation_spacing(space)}
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for s in seeds:
        path = out / f"seed{s}.yaml"
        path.write_text(yaml.safe_dump({**flat, "data_dir": str(data), "fold": 0, "seed": s, "epochs": epochs}))
        files.append(path)
    return files


def config_record(ctx: Context, data: Path, seed: int, storage: Path, set_name: str, search: dict) -> dict[str, Any]:
    """Arm (a): k seeds of the default config trained with arm (b)'s budget, then the same
    ensemble job (D4) over their checkpoints, and the score."""
    arm = Arm("config", "config")
    if not math.isfinite(search["default_epoch_s"] or math.nan):
        raise StepFailed("the search arm's row has no per-epoch time of its default trial")
    epochs = config_epochs(search["parts_s"]["search"], search["default_epoch_s"], ctx.config_seeds, ctx.cores)
    seeds = [seed + i for i in range(ctx.config_seeds)]  # as many members as the search's refits
    configs = train_config_files(data, seeds, epochs, storage / "configs")
    ckpts = [storage / f"seed{s}" for s in seeds]
    cmds = [[sys.executable, "-m", "geopose_ray.train", "--config", str(c), "--data", str(data), "--out", str(k)]
            for c, k in zip(configs, ckpts)]  # fmt: skip
    logs = [ctx.log(set_name, arm, seed, f"train{s}") for s in seeds]
    t_train = run_parallel(ctx, cmds, logs, at_once=ctx.cores)
    archive = storage / "submission.tar.gz"
    t_ens = run_step(ctx, ensemble_cmd(data, storage, archive, ckpts), ctx.log(set_name, arm, seed, "ensemble"))
    search_cpu = (search["parts_s"]["search"] + search["parts_s"]["ensemble"]) * ctx.cores
    return {
        "test": score(ctx, data, archive),
        "parts_s": {"train": t_train, "ensemble": t_ens},
        "epochs": epochs,
        "train_seeds": seeds,
        "budget": {"search_cpu_s": search_cpu, "epoch_s": search["default_epoch_s"], "start_s": START_S},
        "budget_ratio": (t_train + t_ens) * ctx.cores / search_cpu,
    }


def read_rows(results: Path) -> list[dict[str, Any]]:
    if not results.is_file():
        return []
    try:
        return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise InputError(results, f"not JSON lines ({e})") from None


def find_row(rows: list[dict], set_name: str, arm: str, seed: int, quick: bool) -> dict | None:
    return next((r for r in rows if (r.get("set"), r.get("arm"), r.get("seed"), bool(r.get("quick")))
                 == (set_name, arm, seed, quick) and "error" not in r), None)  # fmt: skip


def run_one(ctx: Context, set_name: str, arm: Arm, seed: int, rows: list[dict]) -> dict[str, Any]:
    """One (set, arm, seed): its fresh folder, the arm, its JSON line appended to the results."""
    storage = ctx.arm_dir(set_name, arm, seed)
    print(f"{set_name} {arm.label} seed {seed}: running in {storage}, logs in {ctx.work / 'logs'}", file=sys.stderr)
    shutil.rmtree(storage, ignore_errors=True)  # an interrupted attempt restarts from scratch
    storage.mkdir(parents=True)
    data = data_set(ctx, set_name)
    if arm.kind == "config":
        search = find_row(rows, set_name, "search", seed, ctx.quick)
        if search is None:
            raise StepFailed("arm config needs the search arm's row of this set and seed (run --arms search first)")
        details = config_record(ctx, data, seed, storage, set_name, search)
    else:
        details = search_record(ctx, data, arm, seed, storage, set_name)
    wall = sum(details["parts_s"].values())
    record = common.sig({"bench": BENCH, "set": set_name, "arm": arm.label, "seed": seed, "quick": ctx.quick,
                         "score": details["test"]["final"], "wall_s": wall, "cpu_s": wall * ctx.cores,
                         "cores": ctx.cores, **details, "machine": common.machine()})  # fmt: skip
    with open(ctx.results, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    print(json.dumps(record, default=str), flush=True)
    return record


def plan(ctx: Context, sets: list[str], seeds: list[int], arms: list[Arm], rows: list[dict]) -> list[str]:
    """What a run would do (--dry-run): each (set, seed, arm) in order, done or its command."""
    lines = [f"results: {ctx.results}  ({len(rows)} rows)  cores: {ctx.cores}  quick: {ctx.quick}"]
    for set_name in sets:
        data = data_set(ctx, set_name, dry=True)
        lines.append(f"set {set_name}: {data} (generated and converted before any timed step)")
        for seed in seeds:
            for arm in arms:
                head = f"  {arm.label} seed {seed}: "
                if find_row(rows, set_name, arm.label, seed, ctx.quick):
                    lines.append(head + "done (in the results)")
                elif arm.kind == "config":
                    lines.append(head + f"{ctx.config_seeds} x python -m geopose_ray.train, epochs from the "
                                 "search arm's time (config_epochs), then run_ensemble.py --checkpoints --tta d4")  # fmt: skip
                else:
                    cmd = search_cmd(ctx, data, arm, seed, ctx.arm_dir(set_name, arm, seed))
                    lines.append(head + " ".join(cmd[1:]) + "; run_ensemble.py --tta d4; geopose_ray.score")
    return lines


def ordered(arms: list[Arm]) -> list[Arm]:
    """`search` before `config` (whose budget it measures), the rest after, as given."""
    return sorted(arms, key=lambda a: {"search": 0, "config": 1}.get(a.label, 2))


def parse_args(argv: list[str] | None) -> Any:
    p = common.parser("The search-value bench: the default search against the default config trained with "
                      "the same CPU-seconds, and samplers against random search (docs/SEARCH_VALUE.md).")
    p.add_argument("--sets", help=f"comma list of family sets (default: {','.join(SETS)})")
    p.add_argument("--seeds", help="comma list (default: 0,1,2)")
    p.add_argument("--arms", help=f"comma list (default: {','.join(ARMS)}); config needs search's row")
    p.add_argument("--config-seeds", type=int, default=CONFIG_SEEDS, help="k, arm (a)'s training seeds")
    p.add_argument("--results", type=Path, help="JSON lines file (default: <work>/search_value/results.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="print what would run; run and write nothing")
    p.add_argument("--table", action="store_true", help="print the markdown tables of the results and stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    work = (a.work.resolve() if a.work else paths.home() / "bench") / BENCH  # created only by a run
    ctx = Context(work, (a.results or work / "results.jsonl").resolve(), a.quick, os.cpu_count() or 1, a.config_seeds)
    rows = read_rows(ctx.results)
    if a.table:
        print(*render(rows, quick=a.quick), sep="\n")
        return 0
    sets = a.sets.split(",") if a.sets else list(QUICK_SETS if a.quick else SETS)
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise InputError("--sets", f"{unknown}: the bench runs only the held-out sets {', '.join(SETS)}")
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(QUICK_SEEDS if a.quick else SEEDS)
    arms = ordered([parse_arm(t) for t in (a.arms.split(",") if a.arms else QUICK_ARMS if a.quick else ARMS)])
    if a.dry_run:
        print(*plan(ctx, sets, seeds, arms, rows), sep="\n")
        return 0
    ctx.work.mkdir(parents=True, exist_ok=True)
    failed = 0
    for set_name in sets:
        for seed in seeds:
            for arm in arms:
                if find_row(rows, set_name, arm.label, seed, ctx.quick):
                    continue
                try:
                    rows.append(run_one(ctx, set_name, arm, seed, rows))
                except StepFailed as e:
                    failed += 1
                    print(json.dumps({"bench": BENCH, "set": set_name, "arm": arm.label, "seed": seed,
                                      "error": str(e)}), flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
