"""convert + data.cache: bad input stops the CLI before anything is converted (exit 2, one line
naming the file); the cache holds the exact data; re-runs skip, crashes and concurrent runs are safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from helpers_data import BAD_INPUTS, first
from rasterio.errors import NotGeoreferencedWarning
from test_layout import make_layout

from geopose_ray.config import DataConfig
from geopose_ray.convert import MapFn, convert, ensure_cache, process_map, serial_map
from geopose_ray.data import cache, folds, io, layout
from geopose_ray.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "geopose_ray.convert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_naming_the_file(tmp_path, case):
    data = make_layout(tmp_path / "data")
    bad = BAD_INPUTS[case](data)
    result = _cli(str(data), "--cache", str(tmp_path / "cache"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0]
    assert not (tmp_path / "cache").exists()  # validation precedes any conversion


def _cache_state(cache_dir: Path) -> dict[str, object]:
    """Everything a consumer sees: the CSV texts and each tile's decoded pixels."""
    state: dict[str, object] = {"samples.csv": (cache_dir / "samples.csv").read_text()}
    for path in sorted(cache_dir.rglob("[!.]*.tif")):  # not a crashed run's temporary files
        state[path.relative_to(cache_dir).as_posix()] = (
            io.read_rgb(path) if "_RGB" in path.name else io.read_agl_cm(path)
        )
    return state


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def _map(kind: str, request: pytest.FixtureRequest) -> MapFn:
    """Every parallel map a caller injects: the one conversion must give the same cache."""
    if kind == "ray":
        from geopose_ray import ray_env

        request.getfixturevalue("ray_session")
        return ray_env.task_map
    return {"serial": serial_map, "processes": process_map(2)}[kind]


@pytest.mark.parametrize("kind", ["serial", "processes", "ray"])
def test_cache_holds_the_exact_data(tmp_path, kind, request):
    data = make_layout(tmp_path / "data")
    out = convert(data, tmp_path / "cache", map_fn=_map(kind, request), progress=False)
    assert out == (tmp_path / "cache").resolve()
    train, test = cache.load_cache(out, "train"), cache.load_cache(out, "test")
    sources = {s.id: s for s in layout.load_split(data, "train") + layout.load_split(data, "test")}
    assert {s.id for s in train + test} == set(sources) and len(test) == 4
    for c in train + test:
        src = sources[c.id]
        assert (c.city, c.gsd, c.split) == (src.city, src.gsd, src.split)
        np.testing.assert_array_equal(io.read_rgb(c.rgb), io.read_rgb(src.rgb))
        with rasterio.open(c.rgb) as ds:
            assert ds.block_shapes[0] == (256, 256) and ds.compression is None
    for c in train:
        src = sources[c.id]
        np.testing.assert_array_equal(io.read_agl_cm(c.agl), io.read_agl_cm(src.agl))
        doc = json.loads(src.vflow.read_text())
        assert c.scale == pytest.approx(doc["scale"] * 100, rel=1e-12) and c.angle == doc["angle"]
    assert all(c.agl is None and np.isnan(c.scale) and np.isnan(c.angle) for c in test)
    assert not (out / "folds.csv").exists()  # folds come from each run's config, never the cache
    for c in train:  # each tile's AGL sums, for any split's target means without reading tiles
        agl = io.read_agl(c.agl).astype(np.float64)
        valid = agl[np.isfinite(agl)]
        assert c.agl_n == valid.size and c.agl_sum == pytest.approx(valid.sum(), rel=1e-12)
        assert c.agl_sq == pytest.approx(np.square(valid).sum(), rel=1e-12)


def test_rerun_skips_finished_files_and_repairs_a_crashed_run(tmp_path):
    data = make_layout(tmp_path / "data")
    out = convert(data, tmp_path / "cache", map_fn=serial_map, progress=False)
    reference = _cache_state(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")}
    lost = sorted(stamps)[3]
    lost.unlink()  # as if the run had crashed before this file
    (lost.parent / f".tmp-deadbeef-{lost.name}").write_bytes(b"half a file")
    (out / "samples.csv").unlink()
    convert(data, out, map_fn=serial_map, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != lost)  # skipped
    _assert_same(_cache_state(out), reference)


@pytest.mark.parametrize("kind", ["serial", "ray"])
def test_file_that_fails_to_decode_during_conversion_names_it(tmp_path, kind, request):
    """A corrupt block that the cheap checks do not read still ends in InputError, not a crash."""
    data = make_layout(tmp_path / "data", size=256)
    agl = first(data).agl
    cm = io.read_agl_cm(agl)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        profile = {"driver": "GTiff", "width": 256, "height": 256, "count": 1, "dtype": "uint16"}
        with rasterio.open(
            agl, "w", tiled=True, blockxsize=64, blockysize=64, compress="deflate", **profile
        ) as ds:
            ds.write(cm)
    with rasterio.open(agl) as ds:
        start = int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
    raw = bytearray(agl.read_bytes())
    raw[start : start + 1000] = bytes(1000)  # the first block's deflate stream
    agl.write_bytes(bytes(raw))
    layout.validate_samples([first(data)])  # passes: it reads only the last block row
    with pytest.raises(InputError) as e:
        convert(data, tmp_path / "cache", map_fn=_map(kind, request), progress=False)
    assert e.value.path == str(agl)


def test_ensure_cache_converts_only_when_needed(tmp_path):
    data = make_layout(tmp_path / "data")
    out = ensure_cache(data, tmp_path / "cache", map_fn=serial_map, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert ensure_cache(data, out, map_fn=serial_map) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    train_csv = pd.read_csv(data / "geopose_train.csv", dtype=str)
    train_csv.iloc[1:].to_csv(data / "geopose_train.csv", index=False)  # the data set changed
    assert not cache.is_current(data, out)
    ensure_cache(data, out, map_fn=serial_map, progress=False)
    assert {s.id for s in cache.load_cache(out, "train")} == set(train_csv["id"][1:])
    index = pd.read_csv(out / "samples.csv")
    index.drop(columns=["place", *cache.STATS_COLUMNS]).to_csv(out / "samples.csv", index=False)  # an older cache
    assert not cache.is_current(data, out)
    with pytest.raises(InputError, match="older cache"):
        cache.load_cache(out, "train")
    tifs = {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")}
    ensure_cache(data, out, map_fn=serial_map, progress=False)  # re-indexed; the tiles stay
    assert all(c.agl_n > 0 and c.height == c.width == 64 and c.place for c in cache.load_cache(out, "train"))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")} == tifs


def test_a_run_never_converts_it_names_the_command_that_does(tmp_path):
    from geopose_ray.config import Config
    from geopose_ray.data.loaders import split_samples

    data = make_layout(tmp_path / "data")
    cfg = Config.from_dict({"data_dir": str(data), "cache_dir": str(tmp_path / "cache"), "n_folds": 2})
    with pytest.raises(InputError, match=r"python -m geopose_ray\.convert") as e:
        split_samples(cfg)
    assert e.value.path == str(tmp_path / "cache" / "samples.csv")
    assert not (tmp_path / "cache").exists()
    ensure_cache(data, tmp_path / "cache", map_fn=serial_map, progress=False)
    train, val = split_samples(cfg)
    assert train and val


def test_load_cache_without_conversion_names_samples_csv(tmp_path):
    with pytest.raises(InputError) as e:
        cache.load_cache(tmp_path, "train")
    assert e.value.path == str(tmp_path / "samples.csv") and "geopose_ray.convert" in e.value.problem


def test_two_concurrent_conversions_give_identical_complete_caches(tmp_path):
    data = make_layout(tmp_path / "data", per_city=6)
    reference = _cache_state(convert(data, tmp_path / "reference", map_fn=serial_map, progress=False))
    shared = tmp_path / "shared"
    cmd = [sys.executable, "-m", "geopose_ray.convert", str(data), "--cache", str(shared), "--workers", "2"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    _assert_same(_cache_state(shared), reference)
    assert not list(shared.rglob(".tmp-*"))


def test_synthetic_set_converts_and_place_folds_keep_scenes_together(synthetic_dir, tmp_path):
    out = convert(synthetic_dir, tmp_path / "cache", map_fn=serial_map, progress=False)
    train, test = cache.load_cache(out, "train"), cache.load_cache(out, "test")
    meta = pd.read_csv(synthetic_dir / "metadata.csv", dtype=str).set_index("id")
    assert len(train) == 12 and len(test) == 4
    assert all(s.group == meta.loc[s.id, "group"] for s in train + test)
    assert all(s.place == f"{s.city}/{s.group}" for s in train)  # the given group is the place
    stored = folds.config_folds(train, DataConfig(n_folds=2))  # the default: place folds
    for group in {s.group for s in train}:
        assert len({stored[s.id] for s in train if s.group == group}) == 1, group
    assert set(stored.values()) == {0, 1}


def test_without_a_group_column_places_are_found_and_no_place_sits_in_two_folds(tmp_path):
    """The real data has no `group` column: conversion finds the places (tiles that show the same
    ground), and the default folds keep each in one fold."""
    from geopose_ray.data.places import pair_precision_recall
    from geopose_ray.synthetic import generate

    data = generate(tmp_path / "set", size=96, per_city=12, test_per_city=1, seed=3, views=3)
    meta = pd.read_csv(data / "metadata.csv", dtype=str)
    train_ids = {s.id for s in layout.load_split(data, "train")}
    truth = {r.id: f"{r.city}/{r.group}" for r in meta.itertuples() if r.id in train_ids}
    meta.drop(columns=["group"]).to_csv(data / "metadata.csv", index=False)
    train = cache.load_cache(convert(data, tmp_path / "cache", map_fn=serial_map, progress=False), "train")
    assert not any(s.group for s in train)
    precision, recall = pair_precision_recall({s.id: s.place for s in train}, truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assignment = folds.config_folds(train, DataConfig(n_folds=3))
    for place in {truth[s.id] for s in train}:
        assert len({assignment[s.id] for s in train if truth[s.id] == place}) == 1, place
