"""Submission writer -> packer -> checker -> scorer, and the checker's refusals."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from oracles import SubmissionWriter

from geopose_ray.constants import AGL_MAX_CM, SUBMISSION_ARCHIVE
from geopose_ray.data import io
from geopose_ray.errors import EXIT_BAD_INPUT, run_cli
from geopose_ray.score import score_dirs
from geopose_ray.submission import check_submission, inspect_submission, pack, write_prediction
from geopose_ray.submission.__main__ import main

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

SHAPES = {"ARG_a00001": (16, 16), "ATL_a00002": (16, 24), "JAX_a00003": (12, 16), "OMA_a00004": (16, 16)}


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path]:
    """(data dir with geopose_test.csv + test RGBs, truth dir with the test labels)."""
    data, truth = tmp_path / "data", tmp_path / "truth"
    (data / "test").mkdir(parents=True)
    truth.mkdir()
    rng = np.random.default_rng(0)
    rows = ["id,rgb"]
    for stem, shape in SHAPES.items():
        io.write_rgb_j2k(data / "test" / f"{stem}_RGB.j2k", rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
        agl = rng.gamma(1.5, 4.0, shape)
        agl[rng.random(shape) < 0.1] = np.nan
        io.write_agl_cm(truth / f"{stem}_AGL.tif", agl)
        io.write_vflow(truth / f"{stem}_VFLOW.json", io.VFlow(rng.uniform(0.6, 1.1), rng.uniform(-3, 3)))
        rows.append(f"{stem[4:]},{stem}_RGB.j2k")
    (data / "geopose_test.csv").write_text("\n".join(rows) + "\n")
    return data, truth


def _perfect(truth: Path, out: Path) -> SubmissionWriter:
    """Predictions copied from the truth through the writer (no-data pixels predicted as 0 m)."""
    writer = SubmissionWriter(out)
    for vflow in sorted(truth.glob("*_VFLOW.json")):
        stem = vflow.name[: -len("_VFLOW.json")]
        flow = io.read_vflow(vflow)
        agl = np.nan_to_num(io.read_agl(truth / f"{stem}_AGL.tif"), nan=0.0)
        writer.write(stem, agl, flow.scale, flow.angle)
    return writer


def _write_tif(path: Path, chw: np.ndarray) -> None:
    """A GeoTIFF of any dtype / band count, to fake what the writer would never produce."""
    c, h, w = chw.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=chw.dtype) as ds:
        ds.write(chw)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_write_check_score_round_trip(dataset, tmp_path, capsys):
    data, truth = dataset
    writer = _perfect(truth, tmp_path / "pred")
    archive = writer.pack()
    assert archive == tmp_path / "pred" / SUBMISSION_ARCHIVE
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    expected = sorted(f"{s}{suffix}" for s in SHAPES for suffix in ("_AGL.tif", "_VFLOW.json"))
    assert names == expected  # at the archive root, nothing else
    assert not list(archive.parent.glob(".tmp-*"))  # atomic write left no temporary behind

    code, out, err = _cli(["check", str(archive), "--data", str(data)], capsys)
    assert code == 0, out + err
    assert out.strip() == f"valid: {len(SHAPES)} tiles" and err == ""

    res = score_dirs(truth, archive)
    assert res["final"] == pytest.approx(1.0, abs=1e-12)
    assert res["failures"] == {}


def test_writer_units_rounding_and_clipping(tmp_path):
    agl = np.array([[-3.0, 0.004], [1.236, 1000.0]])  # m: negative, rounds to 0 cm, 123.6 cm, too tall
    agl_path, vflow_path = write_prediction(tmp_path, "ARG_x00001", agl, 0.9, -2.5)
    cm = io.read_agl_cm(agl_path)
    assert cm.dtype == np.uint16
    assert cm.tolist() == [[0, 0], [124, AGL_MAX_CM]]
    doc = json.loads(vflow_path.read_text())
    assert doc == pytest.approx({"scale": 0.009, "angle": -2.5})  # px/cm, rad


@pytest.mark.parametrize("bad", ["agl_nan", "scale_nan", "angle_inf", "agl_3d"])
def test_writer_refuses_non_finite_or_misshaped(tmp_path, bad):
    agl = np.ones((4, 4))
    args = {
        "agl_nan": (np.where(np.eye(4) > 0, np.nan, agl), 1.0, 0.0),
        "scale_nan": (agl, float("nan"), 0.0),
        "angle_inf": (agl, 1.0, float("inf")),
        "agl_3d": (agl[None], 1.0, 0.0),
    }[bad]
    with pytest.raises(ValueError, match="ARG_x00001"):
        write_prediction(tmp_path, "ARG_x00001", *args)
    assert not list(tmp_path.iterdir())


def test_incomplete_submission_is_refused_naming_the_file(dataset, tmp_path, capsys):
    data, truth = dataset
    writer = _perfect(truth, tmp_path / "pred")
    (tmp_path / "pred" / "JAX_a00003_VFLOW.json").unlink()
    archive = writer.pack(tmp_path / "sub.tar.gz")
    problems = check_submission(archive, data)
    assert len(problems) == 1 and "JAX_a00003_VFLOW.json" in problems[0] and "missing" in problems[0]
    code, out, _ = _cli(["check", str(archive), "--data", str(data)], capsys)
    assert code == 1
    lines = out.splitlines()
    assert "JAX_a00003_VFLOW.json" in lines[0] and lines[-1].startswith("invalid:")


@pytest.mark.parametrize(
    "spoil", ["wrong_shape", "float32", "two_bands", "nan_json", "not_json", "corrupt_tif"]
)
def test_checker_refuses_bad_files(dataset, tmp_path, spoil):
    data, truth = dataset
    pred = tmp_path / "pred"
    _perfect(truth, pred)
    agl, js = pred / "ATL_a00002_AGL.tif", pred / "ATL_a00002_VFLOW.json"
    if spoil == "wrong_shape":
        write_prediction(pred, "ATL_a00002", np.ones((16, 16)), 1.0, 0.0)  # its RGB is 16 x 24
    elif spoil == "float32":
        _write_tif(agl, np.ones((1, 16, 24), np.float32))
    elif spoil == "two_bands":
        _write_tif(agl, np.ones((2, 16, 24), np.uint16))
    elif spoil == "nan_json":
        js.write_text('{"scale": 0.01, "angle": NaN}')
    elif spoil == "not_json":
        js.write_text("{scale")
    else:
        agl.write_bytes(agl.read_bytes()[:200])
    problems = check_submission(pack(pred), data)
    assert len(problems) == 1, problems
    named = js.name if "json" in spoil else agl.name
    assert problems[0].startswith(named)


def test_extra_file_is_only_a_warning(dataset, tmp_path, capsys):
    data, truth = dataset
    pred = tmp_path / "pred"
    _perfect(truth, pred)
    write_prediction(pred, "OMA_zzzzzz", np.ones((16, 16)), 1.0, 0.0)  # not a test tile
    archive = pack(pred)
    report = inspect_submission(archive, data)
    assert report.problems == []
    assert len(report.warnings) == 2 and all("OMA_zzzzzz" in w for w in report.warnings)
    code, out, err = _cli(["check", str(archive), "--data", str(data)], capsys)
    assert code == 0 and out.strip() == f"valid: {len(SHAPES)} tiles"
    assert "warning:" in err and "OMA_zzzzzz" in err


def test_checker_accepts_a_folder_too(dataset, tmp_path):
    data, truth = dataset
    _perfect(truth, tmp_path / "pred")
    assert check_submission(tmp_path / "pred", data) == []


def test_missing_inputs_exit_2(dataset, tmp_path, capsys):
    data, truth = dataset
    archive = _perfect(truth, tmp_path / "pred").pack()
    for argv in (
        ["check", str(tmp_path / "nope.tar.gz"), "--data", str(data)],
        ["check", str(archive), "--data", str(tmp_path / "no_data")],
        ["pack", str(tmp_path / "no_preds")],
    ):
        code, _, err = _cli(argv, capsys)
        assert code == EXIT_BAD_INPUT, argv
        assert len(err.strip().splitlines()) == 1 and "error:" in err
    (data / "test" / "OMA_a00004_RGB.j2k").unlink()  # the data set itself is broken
    code, _, err = _cli(["check", str(archive), "--data", str(data)], capsys)
    assert code == EXIT_BAD_INPUT and "OMA_a00004_RGB.j2k" in err


def test_pack_cli_and_module_entry_point(dataset, tmp_path):
    data, truth = dataset
    _perfect(truth, tmp_path / "pred")
    out = tmp_path / "out" / "s.tar.gz"
    run = [sys.executable, "-m", "geopose_ray.submission"]
    proc = subprocess.run(
        [*run, "pack", str(tmp_path / "pred"), "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    proc = subprocess.run([*run, "check", str(out), "--data", str(data)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"valid: {len(SHAPES)} tiles", proc.stderr


def test_synthetic_perfect_predictions_score_one(request, tmp_path, capsys):
    synthetic = importlib.import_module("geopose_ray.synthetic")
    if not hasattr(synthetic, "generate"):
        pytest.skip("geopose_ray.synthetic.generate not available yet")
    root: Path = request.getfixturevalue("synthetic_dir")
    truth = root / "truth"
    writer = _perfect(truth, tmp_path / "pred")
    archive = writer.pack()
    code, out, err = _cli(["check", str(archive), "--data", str(root)], capsys)
    assert code == 0, out + err
    n_test = len((root / "geopose_test.csv").read_text().strip().splitlines()) - 1
    assert out.strip() == f"valid: {n_test} tiles" and n_test == len(writer.stems)
    res = score_dirs(truth, archive)
    assert res["final"] == pytest.approx(1.0, abs=1e-12)


def test_nodata_in_a_prediction_is_a_warning(dataset, tmp_path):
    # a predicted 65535 is legal but drops the pixel from the score (official quirk): say so
    data, truth = dataset
    pred = tmp_path / "pred"
    _perfect(truth, pred)
    cm = io.read_agl_cm(pred / "ARG_a00001_AGL.tif")
    cm[3, 4] = 65535
    _write_tif(pred / "ARG_a00001_AGL.tif", cm[None])
    report = inspect_submission(pack(pred), data)
    assert report.problems == []
    assert len(report.warnings) == 1 and report.warnings[0].startswith("ARG_a00001_AGL.tif")
