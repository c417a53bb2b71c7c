"""The plan of a search, as `run_search.py --dry-run` prints it: the data, the space, the
sampler and why, the resources per trial and how many trials fit, the experiment, its study and
fingerprint, the weights (in the cache or to download), the derived defaults, the refits and a
rough estimate of the wall time. It checks what a run checks and downloads, converts, writes and
trains nothing. No `ray`: the caller passes the cluster's size (`capacity.local_cluster()` for a
local plan, read without starting Ray; `ray_env.cluster_resources()` once it joined a cluster).

The estimate is a cost model, not a measurement of this machine: ASHA's expected epochs x the
crop pixels of an epoch x an assumed rate per worker, plus a fixed start-up per trial, over the
trials at once (docs/CLUSTER.md, 'Cost model').
"""

from __future__ import annotations

from pathlib import Path

from geopose_ray import paths
from geopose_ray.config import Config
from geopose_ray.console import duration
from geopose_ray.constants import MIN_BN_TILES, MIN_RUNG_BN_TILES, TTA_VIEWS, bn_tile_count
from geopose_ray.data import derive
from geopose_ray.data.stats import DataStats
from geopose_ray.experiment import MEMBERS
from geopose_ray.redact import mask_url
from geopose_ray.tune.capacity import TrialResources
from geopose_ray.tune.identity import Identity, check_resumable, identify, provenance
from geopose_ray.tune.options import (
    SearchOptions,
    cached_weights,
    check_capacity_options,
    check_mlflow,
    check_optuna_storage,
    check_sampler,
    check_storage,
    load_run_space,
    measure_data,
    optuna_study,
    resolve_capacity,
    resolve_experiment,
    resolve_resources,
    resolve_sampler,
    resolve_space,
)
from geopose_ray.tune.refit_plan import MIN_OOF_PLACES, fold_places, refit_epochs, refit_folds
from geopose_ray.tune.sampler import describe
from geopose_ray.tune.signal import RULE
from geopose_ray.tune.space import SearchSpace

Cluster = tuple[dict[str, float], dict[str, float] | None]
# seconds per million crop pixels trained by one worker, validation included, and the fixed cost
# of a trial (Tune's actor, Train's controller and worker, each importing torch; the data and
# model built): measured in `make search` on 2 cores, two trials at once (docs/BENCHMARKS.md,
# 'Trial cost in make search', run 5: 10.0 s per default epoch of 1.40 M pixel-equivalents,
# start-ups of 18-30 s in runs 4-5). 15 s and 45 s, measured on slower code, had put a
# heldout-256-single search at ~58 min that took 30 ('The plan against the clock'); GPU assumed
CPU_S_PER_MPX = 7.0
GPU_S_PER_MPX = 0.2
VAL_COST = 1 / 3  # a validated pixel (forward only) against a trained one (forward + backward)
TRIAL_START_S = 25.0
TWO_THREAD_SPEEDUP = 12.4 / 8.9  # one default epoch alone, 1 thread against 2 (docs/BENCHMARKS.md)
EPOCH_OVERHEAD_S = 0.2


def check_search(opts: SearchOptions) -> SearchSpace:
    """Every check of a run that needs neither Ray nor a download, in the order a user fixes them:
    the space with its --set values, the flags, the sampler's name and packages, mlflow's
    package, the Optuna database's URL and driver, a writable --storage, a given data set
    (validated unless its cache is current). Returns the run's space."""
    space = load_run_space(opts)
    check_capacity_options(opts)
    check_sampler(opts, space)
    check_mlflow(opts)
    check_optuna_storage(opts)
    check_storage(opts)
    if opts.data:
        from geopose_ray.data.cache import validate_unless_cached

        validate_unless_cached(opts.data, opts.cache)
    return space


def plan_search(opts: SearchOptions, cluster: Cluster, where: str = "") -> list[str]:
    """What `run_search(opts)` would do, as lines a person reads (`run_search.py --dry-run`), on a
    cluster of `cluster`'s size (`where` says how it was read). Checks everything a run checks
    (`check_search`, the weights in the cache, a --resume's fingerprint); trains nothing."""
    from geopose_ray.data import layout

    base = check_search(opts)
    data = Path(opts.data).resolve() if opts.data else paths.default_data_dir()
    tiles = {split: len(layout.load_split(data, split)) for split in ("train", "test")} if opts.data else None
    measured = measure_data(opts, data) if layout.has_split(data, "train") else None
    space = resolve_space(opts, str(data), measured)
    resources = resolve_resources(opts, space, *cluster)
    concurrent = resolve_capacity(opts, resources).limit(*cluster)
    exp = resolve_experiment(opts, space)
    choice = resolve_sampler(opts, space, concurrent)
    ident = identify(opts, data, measured) if measured is not None else None
    if opts.resume:  # a fingerprint from a sample of tiles may differ from the run's: folds only then
        exact = ident is not None and measured is not None and measured.measured == measured.train_tiles
        check_resumable(exp, space, ident.fingerprint if exact else None, choice.name)
    places = fold_places(opts, data, space) if measured is not None else None
    sched = space.scheduler
    have = {k: cluster[0].get(k, 0.0) for k in ("CPU", "GPU")}
    url, study = optuna_study(opts, exp, ident.fingerprint if ident else None)
    lines = [
        f"data:       {data}  "
        + (f"({tiles['train']} train / {tiles['test']} test tiles)" if tiles else "(the embedded synthetic set)"),
        f"space:      {space.path}  searched: {', '.join(space.searched()) or '-'}",
        f"trials:     {space.num_samples} x up to {sched.max_epochs} epochs on fold {opts.fold}; "
        f"ASHA grace {sched.grace_period}, reduction factor {sched.reduction_factor}"
        + _rung_statistics(space)
        + _rung_signal(space),
        f"sampler:    {choice.name}  {choice.reason}; {describe(choice, space.conditional())}",
        *_budget_lines(space),
        f"per trial:  {resources.workers_per_trial} Train worker(s) x {resources.per_worker()}",
        f"cluster:    {have}; {concurrent} trial(s) at once" + (f"  ({where})" if where else ""),
        f"experiment: {mask_url(exp.location)}" + ("  (resumed)" if opts.resume else ""),
        f"optuna:     {mask_url(url)}  (study {study})",
        *([f"mlflow:     {mask_url(opts.mlflow)}"] if opts.mlflow else []),
        *_weights_lines(opts, base),
        *_identity_lines(ident, measured),
        *_data_lines(ident, measured),
        *_refit_lines(opts, space, exp.file(MEMBERS), places),
        _estimate_line(opts, space, resources, concurrent, measured, places),
    ]
    return lines


def _weights_lines(opts: SearchOptions, space: SearchSpace) -> list[str]:
    """One line per hub weights file: in the cache, or what the run downloads (nothing is)."""
    found = cached_weights(opts, space)
    return [
        f"weights:    {encoder} {tag}: " + (f"cached ({path})" if path else "not cached: the run downloads it first")
        for (encoder, tag), path in found.items()
    ]


def _identity_lines(ident: Identity | None, measured: DataStats | None) -> list[str]:
    """The fingerprint and the code and lock file that would run. Before conversion the derived
    defaults come from a sample of tiles; the run measures every tile and may derive (and so
    fingerprint) otherwise."""
    prov = provenance()
    dirty = " (with uncommitted changes)" if prov["git_dirty"] else ""
    lock = prov["requirements_lock_sha256"][:12]
    sampled = measured is not None and measured.measured < measured.train_tiles
    return [
        "identity:   fingerprint "
        + (ident.fingerprint if ident else "once the embedded set is written (the first run writes it)")
        + ("  (from a sample of tiles: the run measures them all)" if sampled else ""),
        f"code:       git {prov['git_commit'][:12]}{dirty}, requirements.lock sha256 {lock}",
    ]


# Measured on the held-out set heldout-256-single (256 px, 12 train tiles per city, 14 % built,
# roofs leaning up to a third of the tile), a quiet 2-core machine, 2026-12-05: every model at the
# delivered 120 epochs (trials included; the second run at 9e58786); at baaacea, trials of 20
# epochs and refits of 120; at f76c620, refits of 50
SPARSE_EXPECT = (
    "sparse, tall data: on a held-out set like it (256 px, 14 % built, one view per place) the "
    "default search and ensemble scored 0.822 in 57 min and 0.820 in 53 min on 2 cores (two runs, "
    "2026-12-05; the search's figure 0.12-0.14 below them); --max-epochs 20 --refit-epochs 120 scored "
    "0.754 in 31.5 min and --max-epochs 20 --refit-epochs 50 0.657 in 18.5 min, their search's figure "
    "noise. Less than 15 min has not reached 0.6 on such data (docs/LEARNING.md, 'Trials at the "
    "delivered budget')"
)


# Measured 2026-12-03: the default trial was the best of `make search`'s 6 (validation 0.733, the
# next 0.548), as in every earlier make search; and on heldout-128-many at equal CPU the default
# config trained with the whole budget beat the default search (0.599 against 0.286, one seed of
# bench/search_value.py --quick). A search this small mostly pays for its trials' start-up.
SMALL_SEARCH_TRIALS = 10
SMALL_SEARCH_EXPECT = (
    "at {n} trials the likely result is the default config: it was the best trial of every measured make search "
    "(validation 0.733, the next 0.548), and on a held-out set (512 px) the default config trained with "
    "0.8 of the search's CPU-seconds, 109 epochs instead of its 45, scored 0.839 against the search's 0.713 "
    "(one seed of the full bench; docs/SEARCH_VALUE.md)"
)


def _budget_lines(space: SearchSpace) -> list[str]:
    """What a search this small can be expected to find: a person decides whether to pay for it."""
    if space.num_samples > SMALL_SEARCH_TRIALS:
        return []
    return [f"expect:     {SMALL_SEARCH_EXPECT.format(n=space.num_samples)}"]


def _data_lines(ident: Identity | None, measured: DataStats | None) -> list[str]:
    """The plan's measured statistics and the values derived from them, each with its reason."""
    if measured is None or ident is None:
        return ["derived:    measured once the embedded set is written (the first run writes it)"]
    lines = [f"measured:   {line}" for line in measured.lines()]
    lines += [f"derived:    {line}" for line in ident.derived_lines]
    if measured.built < derive.SPARSE_BUILT:
        lines.append(f"expect:     {SPARSE_EXPECT}")
    return lines


def selection_note(opts: SearchOptions, n_folds: int) -> str:
    """How the refit folds' out-of-fold scores may be read: a person sees it in the plan."""
    if opts.fold in refit_folds(opts, n_folds):
        return f"includes the search's fold {opts.fold}: its out-of-fold scores are optimistic"
    return f"not the search's fold {opts.fold}: out-of-fold scores free of the selection"


def _refit_lines(opts: SearchOptions, space: SearchSpace, members: str, places: dict | None) -> list[str]:
    if opts.refit_top <= 0:
        return []
    seeds = f" x {opts.refit_seeds} seeds" if opts.refit_seeds > 1 else ""
    epochs, why = refit_epochs(opts)
    seeds += f", {epochs} epochs" if epochs else ""
    folds = refit_folds(opts, space.n_folds(), places)
    if opts.folds is None:
        how = "up to" if places is None else "as many as hold"  # before conversion: the most
        seeds += f" ({how} {MIN_OOF_PLACES} places per city out of fold)"
    which = "the best config" if opts.refit_top == 1 else f"{opts.refit_top} configs"
    lines = [
        f"refits:     {which}{seeds} on fold(s) {list(folds)}"
        f" ({selection_note(opts, space.n_folds())}) -> {mask_url(members)}"
    ]
    if opts.refit_top > 1:  # refit_choice's rule, in one line
        lines.append("            the best, then other models its fold cannot tell from it, then by score")
    if epochs and not opts.refit_epochs:
        lines.append(f"            {epochs} epochs: {why}")
    if opts.fold not in folds and not epochs:
        lines.append(f"            + the search's full-budget trials on fold {opts.fold}, for the test tiles only")
    return lines


def _rung_statistics(space: SearchSpace) -> str:
    """What the rungs of ASHA compare: scores with BatchNorm statistics re-measured on whole tiles
    every `precise_bn_every` epochs (docs/LEARNING.md, 'What the rungs of ASHA compare')."""
    every = space.remeasure_every()
    return f"; statistics re-measured every {every} epochs for the rungs" if every else ""


def _rung_signal(space: SearchSpace) -> str:
    """When ASHA may cut (`signal.py`): only once a trial shows every target learning."""
    return f"; no cut before the learning signal ({RULE})" if space.scheduler.after_signal else ""


def asha_segments(trials: int, grace: int, factor: int, max_epochs: int) -> list[tuple[int, int, float]]:
    """[(from epoch, to epoch, trials expected to run them)]: every trial reaches the first rung,
    1/factor of them the next, and so on up to max_epochs, but never fewer than one: the best
    trial at a rung is never cut, so a lone trial, or the last of a few, runs to the end
    (docs/CLUSTER.md, 'Cost model')."""
    segments, rung, reached, factor = [], 0, float(trials), max(2, factor)
    for nxt in [*(r for r in _rungs(grace, factor) if r < max_epochs), max_epochs]:
        segments.append((rung, nxt, reached))
        rung, reached = nxt, max(reached / factor, min(1.0, trials))
    return segments


def asha_epochs(trials: int, grace: int, factor: int, max_epochs: int) -> float:
    """Epochs ASHA is expected to run (`asha_segments`)."""
    return sum(n * (b - a) for a, b, n in asha_segments(trials, grace, factor, max_epochs))


def _rungs(grace: int, factor: int) -> list[int]:
    rungs, r = [], max(1, grace)
    while r < 10**6 and len(rungs) < 32:
        rungs.append(r)
        r *= factor
    return rungs


def epoch_seconds(cfg: Config, res: TrialResources, measured: DataStats) -> float:
    """An epoch of one trial at the space's defaults: its crops trained and its fold's tiles
    validated every `val_every` epochs, at the assumed rate, shared by its workers."""
    d = cfg.data
    train_tiles = measured.train_tiles * (d.n_folds - 1) / d.n_folds
    crops = d.epoch_samples or train_tiles * max(1, d.repeat)
    val_side = d.val_crop or measured.tile_px
    val_px = VAL_COST * (measured.train_tiles / d.n_folds) * val_side**2 / max(1, cfg.train.val_every)
    mpx = (crops * d.crop**2 + val_px) / 1e6
    rate = GPU_S_PER_MPX if res.gpus_per_worker > 0 else CPU_S_PER_MPX
    return mpx * rate / max(1, res.workers_per_trial) + EPOCH_OVERHEAD_S


def final_tta_seconds(cfg: Config, res: TrialResources, measured: DataStats) -> float:
    """The last epoch's extra validation through `final_tta`'s views (`train_loop`), paid once by
    every trial that runs to its end and by every refit."""
    if cfg.train.final_tta == "none":
        return 0.0
    val_side = cfg.data.val_crop or measured.tile_px
    mpx = (
        TTA_VIEWS[cfg.train.final_tta]
        * VAL_COST
        * (measured.train_tiles / cfg.data.n_folds)
        * val_side**2
        / 1e6
    )
    rate = GPU_S_PER_MPX if res.gpus_per_worker > 0 else CPU_S_PER_MPX
    return mpx * rate / max(1, res.workers_per_trial)


def remeasure_seconds(cfg: Config, res: TrialResources, measured: DataStats, rung: bool = False) -> float:
    """One re-measure of the BatchNorm statistics (`precise_bn.recompute`): a forward pass over
    whole training tiles (`constants.bn_tile_count`; fewer large ones before a rung)."""
    side = cfg.data.val_crop or measured.tile_px
    tiles = bn_tile_count(measured.train_tiles, side, MIN_RUNG_BN_TILES if rung else MIN_BN_TILES)
    rate = GPU_S_PER_MPX if res.gpus_per_worker > 0 else CPU_S_PER_MPX
    return VAL_COST * tiles * side**2 / 1e6 * rate / max(1, res.workers_per_trial)


def _estimate_line(
    opts: SearchOptions,
    space: SearchSpace,
    res: TrialResources,
    concurrent: int,
    measured: DataStats | None,
    places: dict | None = None,
) -> str:
    """`estimate:` the search's and the refits' wall time, rough, and what it assumed."""
    if measured is None:
        return "estimate:   once the embedded set is written (the data decides crops and epoch size)"
    cfg = Config.from_dict(space.defaults(), strict=False)
    per_epoch = epoch_seconds(cfg, res, measured)
    sched = space.scheduler
    segments = asha_segments(space.num_samples, sched.grace_period, sched.reduction_factor, sched.max_epochs)
    epochs = sum(n * (b - a) for a, b, n in segments)  # asha_epochs
    tta_s = final_tta_seconds(cfg, res, measured)
    ended = segments[-1][2]  # trials ASHA lets run to the end (at least the best one)
    # statistics re-measured every `precise_bn_every` epochs a trial runs (ASHA's rungs, on fewer
    # large tiles), and after the last epoch of the trials that reach it (on the full count)
    every = cfg.train.precise_bn_every
    rungs_n = max(0.0, epochs / every - ended) if every > 0 else 0.0
    bn_s = rungs_n * remeasure_seconds(cfg, res, measured, rung=True) + ended * remeasure_seconds(cfg, res, measured)
    bn_s = bn_s if cfg.train.precise_bn else 0.0
    search_s = (epochs * per_epoch + space.num_samples * TRIAL_START_S + ended * tta_s + bn_s) / max(1, concurrent)
    refits = opts.refit_top * opts.refit_seeds * len(refit_folds(opts, space.n_folds(), places))
    refit_budget = refit_epochs(opts)[0] or sched.max_epochs
    slots = max(1, min(concurrent, refits or 1))
    # a CPU refit alone on slots meant for more trains with their cores (refit.idle_cores)
    speedup = TWO_THREAD_SPEEDUP if res.gpus_per_worker == 0 and concurrent >= 2 * max(1, refits) else 1.0
    refit_s = refits * (refit_budget * per_epoch / speedup + TRIAL_START_S + tta_s) / slots
    device = "GPU" if res.gpus_per_worker > 0 else "CPU"
    # ASHA cuts only what its rungs can rank: where every validation is noise (few tiles per city
    # in a fold), it cut 1 of 6 trials (docs/LEARNING.md, 'Half turns end to end (added 2026-12-03)')
    full = space.num_samples * sched.max_epochs
    worst_s = search_s + (full - epochs) * per_epoch / max(1, concurrent)
    return (
        f"estimate:   ~{duration(search_s + refit_s)} wall time, a rough estimate (search ~{duration(search_s)}: "
        f"~{epochs:.0f} epochs after ASHA of {full}, ~{per_epoch:.0f} s each; "
        f"refits ~{duration(refit_s)}), up to ~{duration(worst_s + refit_s)} if ASHA cuts nothing; assuming "
        f"{CPU_S_PER_MPX if device == 'CPU' else GPU_S_PER_MPX} s per "
        f"million {cfg.data.crop} px crop pixels per {device} worker and {TRIAL_START_S:.0f} s of start-up per trial"
    )
