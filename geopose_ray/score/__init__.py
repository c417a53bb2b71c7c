"""Score a folder or archive of predictions against truth files, exactly as the official scorer.

    python -m geopose_ray.score TRUTH_DIR PREDICTIONS      # the command: `score/__main__.py`

For each city, every `TRUTH_DIR/{CITY}*_VFLOW*.json` (and its `_AGL.tif`) is paired with the
prediction files of the same names. Both AGLs load as 65535 -> NaN, then cm -> m, so a predicted
65535 drops out of the SSE (the official quirk). A missing or unreadable prediction, or a NaN
scale or angle, scores its whole city 0 (official rule), and this tool says so on stderr; bad
truth files are a user error (exit 2). Prints one JSON line; NaN (a city with no truth) is null.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from geopose_ray.constants import CITIES
from geopose_ray.data import io
from geopose_ray.errors import InputError
from geopose_ray.metrics import GeoposeScore, image_sums
from geopose_ray.submission import opened_predictions

OUTPUT_KEYS = ("final", "cities", "agl_r2", "vflow_r2")


def truth_files(truth_dir: str | Path) -> dict[str, list[Path]]:
    """City -> its truth VFLOW jsons, matched as the official `glob(f"{city}*_VFLOW*.json")`."""
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise InputError(truth_dir, "truth folder not found")
    found = {city: sorted(truth_dir.glob(f"{city}*_VFLOW*.json")) for city in CITIES}
    if not any(found.values()):
        raise InputError(truth_dir, f"no {{CITY}}*_VFLOW*.json truth files for any of {CITIES}")
    return found


def agl_name(vflow_name: str) -> str:
    """The AGL file paired with a VFLOW json (the official name rule)."""
    return vflow_name.replace("_VFLOW", "_AGL").replace(".json", ".tif")


def _load_prediction(pred_dir: Path, vflow_name: str, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """(agl m, VFlow) of one prediction, or (None, problem) when it makes the city fail."""
    agl_path, vflow_path = pred_dir / agl_name(vflow_name), pred_dir / vflow_name
    for p in (agl_path, vflow_path):
        if not p.is_file():
            return None, f"{p.name}: prediction missing"
    try:
        agl = io.read_agl(agl_path)  # 65535 -> NaN, then /100
        flow = io.read_vflow(vflow_path)  # refuses NaN / inf scale or angle
    except InputError as e:
        return None, f"{Path(e.path).name}: {e.problem}"
    if agl.shape != shape:
        return None, f"{agl_path.name}: shape {agl.shape} != truth shape {shape}"
    return agl, flow


def score_image(truth_vflow: Path, pred_dir: Path) -> tuple[np.ndarray | None, str | None]:
    """(image_sums row, None), or (None, problem) when the prediction fails this image."""
    truth_agl = io.read_agl(truth_vflow.with_name(agl_name(truth_vflow.name)))  # (H, W) m NaN
    truth = io.read_vflow(truth_vflow)
    agl, flow = _load_prediction(pred_dir, truth_vflow.name, truth_agl.shape)
    if agl is None:
        return None, flow
    return image_sums(truth_agl, agl, truth.scale, truth.angle, flow.scale, flow.angle), None


def score_dirs(truth_dir: str | Path, predictions: str | Path, workers: int | None = None) -> dict[str, Any]:
    """`GeoposeScore.compute()` of the predictions, plus `failures` {city: [problem, ...]}.

    Images are scored in a thread pool (rasterio decodes and numpy reduces without the GIL);
    the per-image sums simply add up, so the order does not matter.
    """
    files = truth_files(truth_dir)
    jobs = [(city, p) for city in CITIES for p in files[city]]
    workers = workers or min(4, os.cpu_count() or 1)
    score = GeoposeScore()
    failures: dict[str, list[str]] = {}
    with opened_predictions(predictions) as pred_dir, ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda job: score_image(job[1], pred_dir), jobs)
        for (city, _), (sums, problem) in zip(jobs, results):
            if sums is None:
                score.mark_failed(city)
                failures.setdefault(city, []).append(str(problem))
            else:
                score.add_image_sums(city, sums)
    return {**score.compute(), "failures": failures}
