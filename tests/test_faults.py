"""Reliability: bad input is refused by every command before any work starts (exit 2, one line
naming the file), and interrupted writes never leave a partial artefact under its final name.
A killed Train worker and non-finite losses through Ray Train: test_faults_train.py.

Proven elsewhere and not repeated here: convert's bad inputs (test_convert, same BAD_INPUTS),
a SIGKILLed run_search.py resumed with --resume (test_search), NaN steps in the core and NaN
weights never saved (test_train_loop), prediction faults zeroing a city (test_score) and two
concurrent conversions giving identical caches (test_convert).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers_data import BAD_INPUTS
from test_layout import make_layout

from geopose_ray.checkpoint import STATE_FILE, load_state, save_state
from geopose_ray.data import cache, io, layout
from geopose_ray.errors import EXIT_BAD_INPUT, run_cli
from geopose_ray.score.__main__ import main as score_main
from geopose_ray.submission import pack, write_prediction

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.fault  # `pytest -m fault` runs the whole reliability suite


# --- 4. bad inputs: every command refuses them at once ----------------------------------------
def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _never(*args, **kwargs):
    raise AssertionError("Ray was started for a data set that should have been refused")


def _run(main, argv: list[str], capsys) -> tuple[int, str, list[str]]:
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    out, err = capsys.readouterr()
    return e.value.code, out, [line for line in err.splitlines() if line.strip()]


def _search(data: Path, tmp_path: Path, monkeypatch) -> tuple[list[str], object]:
    from geopose_ray import ray_env

    monkeypatch.setattr(ray_env, "init", _never)  # the one place that starts or joins Ray
    argv = ["--data", str(data), "--cache", str(tmp_path / "cache"), "--storage", str(tmp_path / "st")]
    return argv, _load_script("run_search").main


def _ensemble(data: Path, tmp_path: Path, monkeypatch) -> tuple[list[str], object]:
    import yaml

    member = tmp_path / "member"  # member selection reads config.yaml only; the data comes next
    member.mkdir()
    (member / STATE_FILE).write_bytes(b"")
    (member / "config.yaml").write_text(yaml.safe_dump({"n_folds": 3, "fold": 0}))
    from geopose_ray import ray_env

    monkeypatch.setattr(ray_env, "init", _never)
    cli = _load_script("run_ensemble")
    argv = ["--data", str(data), "--checkpoints", str(member), "--out", str(tmp_path / "out")]
    return [*argv, "--storage", str(tmp_path / "st")], cli.main


@pytest.mark.parametrize("command", ["run_search", "run_ensemble"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_search_and_ensemble_refuse_bad_data_before_ray(tmp_path, monkeypatch, capsys, command, case):
    monkeypatch.setenv("GEOPOSE_RAY_HOME", str(tmp_path / "home"))
    data = make_layout(tmp_path / "data")
    bad = BAD_INPUTS[case](data)
    argv, main = (_search if command == "run_search" else _ensemble)(data, tmp_path, monkeypatch)
    started = time.monotonic()
    code, out, err = _run(main, argv, capsys)
    assert code == EXIT_BAD_INPUT, err
    assert out == "" and len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err
    assert time.monotonic() - started < 30
    assert not any((tmp_path / d).exists() for d in ("cache", "st", "out"))  # nothing was started


def test_search_and_ensemble_accept_good_data_up_to_ray(tmp_path, monkeypatch, capsys):
    """The control: an intact data set passes the check and reaches `ray.init` (patched out)."""
    monkeypatch.setenv("GEOPOSE_RAY_HOME", str(tmp_path / "home"))
    data = make_layout(tmp_path / "data")
    for make in (_search, _ensemble):
        argv, main = make(data, tmp_path, monkeypatch)
        with pytest.raises(AssertionError, match="Ray was started"):
            main(argv)


# truth files live in the layout's train/ folder ({CITY}_{id}_AGL.tif + _VFLOW.json): the
# scorer applies to the cases that damage one of those, or the folder itself
SCORER_CASES = [
    "missing_agl",
    "truncated_tif",
    "agl_wrong_dtype",
    "vflow_nan",
    "vflow_missing_key",
    "empty_data_folder",
    "missing_data_folder",
]


@pytest.mark.parametrize("case", SCORER_CASES)
def test_scorer_refuses_bad_truth_naming_the_file(tmp_path, capsys, case):
    data = make_layout(tmp_path / "data")
    pred = tmp_path / "pred"
    pred.mkdir()
    for f in (data / "train").glob("*_[AV][GF]L*.*"):  # the truth itself as a perfect prediction
        shutil.copy(f, pred / f.name)
    assert _run(score_main, [str(data / "train"), str(pred)], capsys)[0] == 0
    bad = BAD_INPUTS[case](data)
    code, out, err = _run(score_main, [str(data / "train"), str(pred)], capsys)
    assert code == EXIT_BAD_INPUT and out == ""
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err


# --- 5. atomic artefacts: an interrupted write leaves nothing under the final name ------------
# Runs in a child process that SIGKILLs itself at `point`: "write" = in the middle of writing
# the file (after the tile's pixels went to GDAL / half a checkpoint / the first archive member),
# "rename" = after the whole file is written, just before the rename that publishes it.
KILLED_WRITER = """
import io, os, signal, sys, tarfile
kind, point, src, dst = sys.argv[1:5]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "rename":
    os.replace = die
elif kind == "tile":
    import rasterio.io
    real_write = rasterio.io.DatasetWriter.write
    def write_then_die(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        die()
    rasterio.io.DatasetWriter.write = write_then_die
elif kind == "checkpoint":
    import torch
    real_save = torch.save
    def save_half(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        die()
    torch.save = save_half
elif kind == "archive":
    real_addfile = tarfile.TarFile.addfile
    def add_one_then_die(self, *args, **kwargs):
        if self.members:
            self.fileobj.flush()
            die()
        return real_addfile(self, *args, **kwargs)
    tarfile.TarFile.addfile = add_one_then_die

from test_faults import write_artefact
write_artefact(kind, src, dst)
"""


def checkpoint_state(epoch: int, n: int = 64 * 1024) -> dict:
    return {"model": {"w": torch.full((n,), float(epoch))}, "epoch": epoch, "config": {"epochs": epoch}}


def write_artefact(kind: str, src: str | Path, dst: str | Path) -> Path:
    """Write one artefact of `kind` from `src` into the folder `dst`; returns its final path."""
    src, dst = Path(src), Path(dst)
    if kind == "tile":
        sample = layout.load_split(src, "train")[0]
        cache.convert_sample(sample, dst)
        return cache.cache_paths(sample, dst)[0]
    if kind == "checkpoint":
        return save_state(dst, checkpoint_state(epoch=2))
    return pack(src, dst / "submission.tar.gz")


def _source(kind: str, tmp_path: Path, size: int = 64) -> Path:
    if kind == "tile":
        return make_layout(tmp_path / "data", per_city=1, test_per_city=0, size=size)
    pred = tmp_path / "pred"
    rng = np.random.default_rng(0)
    for i in range(2):  # random heights: the files barely compress
        write_prediction(pred, f"ARG_{i:06d}", rng.uniform(0, 600, (size, size)), 1.0, 0.5)
    return pred


def _check_artefact(kind: str, final: Path, src: Path) -> None:
    """The file under its final name is complete."""
    if kind == "tile":
        np.testing.assert_array_equal(io.read_rgb(final), io.read_rgb(layout.load_split(src, "train")[0].rgb))
    elif kind == "checkpoint":
        torch.testing.assert_close(load_state(final.parent)["model"]["w"], checkpoint_state(2)["model"]["w"])
    else:
        with tarfile.open(final, "r:gz") as tar:
            assert sorted(tar.getnames()) == sorted(p.name for p in src.iterdir())


@pytest.mark.parametrize("point", ["write", "rename"])
@pytest.mark.parametrize("kind", ["tile", "checkpoint", "archive"])
def test_killed_write_leaves_no_partial_file_and_a_rerun_completes(tmp_path, kind, point):
    src, dst = _source(kind, tmp_path), tmp_path / "out"
    dst.mkdir()
    if kind == "checkpoint":  # a checkpoint folder is overwritten in place: the old state must survive
        save_state(dst, checkpoint_state(epoch=1))
    script = tmp_path / "killed_writer.py"
    script.write_text(KILLED_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, str(script), kind, point, str(src), str(dst)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    left = [p for p in dst.rglob("*") if p.is_file()]
    assert any(p.name.startswith(".tmp-") for p in left), left  # it died while writing
    if kind == "checkpoint":
        assert load_state(dst)["epoch"] == 1  # the previous checkpoint, intact
    else:
        assert not [p for p in left if not p.name.startswith(".tmp-")], left  # nothing published
    _check_artefact(kind, write_artefact(kind, src, dst), src)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root or CAP_SYS_ADMIN; skipped otherwise), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small tmpfs to fill")
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root / CAP_SYS_ADMIN): {out.stderr.strip()}")
    yield mnt
    if subprocess.run(["umount", str(mnt)]).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=True)  # detach now, free when unused


@pytest.mark.parametrize("kind", ["tile", "checkpoint", "archive"])
def test_full_disk_leaves_no_partial_file_and_a_rerun_completes(tmp_path, small_disk, kind):
    src = _source(kind, tmp_path, size=384)  # each artefact ~0.3-0.5 MB
    dst = small_disk / "out"
    dst.mkdir()
    filler = small_disk / "filler"
    stat = os.statvfs(small_disk)
    filler.write_bytes(bytes(stat.f_bavail * stat.f_frsize - 100 * 1024))  # ~100 KiB left
    try:  # not pytest.raises: its traceback would keep the failed writer's file open
        write_artefact(kind, src, dst)
    except Exception as e:  # GDAL, torch and tarfile each word ENOSPC their own way
        print(f"{kind} on a full disk: {e.__class__.__name__}: {str(e)[:200]}")
    else:
        pytest.fail("the write did not fail on a full disk")
    assert [p for p in dst.rglob("*") if p.is_file()] == []  # neither a partial file nor a temporary
    filler.unlink()  # space again: the same command now completes
    _check_artefact(kind, write_artefact(kind, src, dst), src)
