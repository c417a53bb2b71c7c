"""The scorer CLI on tiny truth/prediction folders written with the data.io writers."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import uuid
from io import BytesIO as io_bytes
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geopose_ray.constants import AGL_NODATA, CITIES
from geopose_ray.data import io
from geopose_ray.errors import EXIT_BAD_INPUT, run_cli
from geopose_ray.metrics import GeoposeScore
from geopose_ray.score import score_dirs
from geopose_ray.score.__main__ import main
from geopose_ray.submission import pack

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

PER_CITY = {"ARG": 2, "ATL": 1, "JAX": 1, "OMA": 2}
SIZE = 16  # px


def make_truth(folder: Path, seed: int = 0) -> list[str]:
    """Truth AGL (with no-data pixels) and VFLOW files; returns the stems."""
    rng = np.random.default_rng(seed)
    stems = []
    for city, k in PER_CITY.items():
        for i in range(k):
            stem = f"{city}_t{seed}{i:04d}"
            agl = rng.gamma(1.5, 4.0, (SIZE, SIZE))  # m
            agl[rng.random(agl.shape) < 0.1] = np.nan  # -> 65535 on disk
            io.write_agl_cm(folder / f"{stem}_AGL.tif", agl)
            io.write_vflow(folder / f"{stem}_VFLOW.json", io.VFlow(rng.uniform(0.6, 1.1), rng.uniform(-3, 3)))
            stems.append(stem)
    return stems


def write_predictions(
    truth: Path, out: Path, stems: list[str], noise: float = 0.0, seed: int = 1, flow_noise: bool = True
) -> None:
    """Predictions = truth (+ Gaussian noise on AGL, and on scale and angle with flow_noise)."""
    rng = np.random.default_rng(seed)
    for stem in stems:
        agl = np.nan_to_num(io.read_agl(truth / f"{stem}_AGL.tif"), nan=1.0)
        flow = io.read_vflow(truth / f"{stem}_VFLOW.json")
        if noise:
            agl = np.abs(agl + rng.normal(0, noise, agl.shape))
        if noise and flow_noise:
            flow = io.VFlow(flow.scale * rng.uniform(0.9, 1.1), flow.angle + rng.normal(0, 0.2))
        io.write_agl_cm(out / f"{stem}_AGL.tif", agl)
        io.write_vflow(out / f"{stem}_VFLOW.json", flow)


def _raw_agl_m(path: Path) -> np.ndarray:
    """Loaded as the official loader does, independently of data.io: float32, 65535 -> NaN, / 100."""
    with rasterio.open(path) as ds:
        a = ds.read(1).astype(np.float32)
    np.putmask(a, a == AGL_NODATA, np.nan)
    return (a / 100.0).astype(np.float32)


def _in_memory_score(truth: Path, pred: Path, stems: list[str]) -> dict:
    score = GeoposeScore()
    for stem in stems:
        t, p = io.read_vflow(truth / f"{stem}_VFLOW.json"), io.read_vflow(pred / f"{stem}_VFLOW.json")
        gt, pr = _raw_agl_m(truth / f"{stem}_AGL.tif"), _raw_agl_m(pred / f"{stem}_AGL.tif")
        score.update(stem[:3], gt, pr, t.scale, t.angle, p.scale, p.angle)
    return score.compute()


@pytest.fixture
def truth(tmp_path) -> tuple[Path, list[str]]:
    folder = tmp_path / "truth"
    folder.mkdir()
    return folder, make_truth(folder)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_perfect_predictions_score_one(truth, tmp_path, capsys):
    folder, stems = truth
    pred = tmp_path / "pred"
    write_predictions(folder, pred, stems)
    code, out, err = _cli([str(folder), str(pred)], capsys)
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert set(doc) == {"final", "cities", "agl_r2", "vflow_r2"}
    assert doc["final"] == pytest.approx(1.0, abs=1e-12)
    assert set(doc["cities"]) == set(CITIES)


def test_noisy_predictions_match_in_memory_score(truth, tmp_path):
    folder, stems = truth
    pred = tmp_path / "pred"
    write_predictions(folder, pred, stems, noise=3.0)
    res = score_dirs(folder, pred, workers=2)
    ref = _in_memory_score(folder, pred, stems)
    assert 0 < res["final"] < 0.99
    assert res["final"] == pytest.approx(ref["final"], rel=1e-12)
    for c in CITIES:
        assert res["cities"][c] == pytest.approx(ref["cities"][c], rel=1e-12)
    assert res["failures"] == {}


def test_folder_and_tar_gz_give_the_same_score(truth, tmp_path, capsys):
    folder, stems = truth
    pred = tmp_path / "pred"
    write_predictions(folder, pred, stems, noise=2.0)
    archive = pack(pred, tmp_path / "sub.tar.gz")
    _, out_dir, _ = _cli([str(folder), str(pred)], capsys)
    code, out_tar, _ = _cli([str(folder), str(archive)], capsys)
    assert code == 0 and json.loads(out_dir) == json.loads(out_tar)


@pytest.mark.parametrize("spoil", ["missing_agl", "missing_json", "nan_json", "wrong_shape", "corrupt_tif"])
def test_bad_prediction_zeroes_its_city_and_says_so(truth, tmp_path, capsys, spoil):
    folder, stems = truth
    pred = tmp_path / "pred"
    write_predictions(folder, pred, stems)
    victim = next(s for s in stems if s.startswith("ARG"))
    agl, js = pred / f"{victim}_AGL.tif", pred / f"{victim}_VFLOW.json"
    named = agl
    if spoil == "missing_agl":
        agl.unlink()
    elif spoil == "missing_json":
        js.unlink()
        named = js
    elif spoil == "nan_json":
        js.write_text('{"scale": NaN, "angle": 0.5}')
        named = js
    elif spoil == "wrong_shape":
        io.write_agl_cm(agl, np.ones((SIZE, SIZE + 1)))
    else:
        agl.write_bytes(b"not a tiff")
    code, out, err = _cli([str(folder), str(pred)], capsys)
    doc = json.loads(out)
    assert code == 0
    assert doc["cities"]["ARG"] == 0.0
    assert doc["cities"]["JAX"] == pytest.approx(1.0, abs=1e-12)
    assert doc["final"] == pytest.approx(3 / 4, abs=1e-12)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "ARG" in lines[0] and named.name in lines[0]


def test_predicted_65535_drops_out_of_sse(truth, tmp_path):
    folder, stems = truth
    stem = next(s for s in stems if s.startswith("OMA"))
    gt = io.read_agl(folder / f"{stem}_AGL.tif")
    r, c = np.argwhere(np.isfinite(gt))[0]
    results = {}
    for name, value in (("exact", gt[r, c]), ("wrong", gt[r, c] + 300.0), ("nodata", np.nan)):
        pred = tmp_path / name
        write_predictions(folder, pred, stems, noise=1.0, flow_noise=False)
        agl = io.read_agl(pred / f"{stem}_AGL.tif")
        agl[r, c] = value
        io.write_agl_cm(pred / f"{stem}_AGL.tif", agl)  # NaN -> 65535 on disk
        results[name] = score_dirs(folder, pred)["cities"]["OMA"]
    assert results["nodata"] == pytest.approx(results["exact"], rel=1e-12)
    assert results["wrong"] < results["nodata"]


def test_city_without_truth_gives_null(truth, tmp_path, capsys):
    folder, stems = truth
    for p in folder.glob("JAX_*"):
        p.unlink()
    pred = tmp_path / "pred"
    write_predictions(folder, pred, [s for s in stems if not s.startswith("JAX")])
    code, out, _ = _cli([str(folder), str(pred)], capsys)
    doc = json.loads(out)  # strict JSON: NaN printed as null
    assert code == 0 and doc["cities"]["JAX"] is None and doc["final"] is None
    assert doc["cities"]["ARG"] == pytest.approx(1.0, abs=1e-12)


def test_bad_inputs_exit_2(truth, tmp_path, capsys):
    folder, stems = truth
    pred = tmp_path / "pred"
    write_predictions(folder, pred, stems)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "truth missing": [str(tmp_path / "nope"), str(pred)],
        "truth empty": [str(empty), str(pred)],
        "predictions missing": [str(folder), str(tmp_path / "nope.tar.gz")],
    }
    for case, argv in cases.items():
        code, out, err = _cli(argv, capsys)
        assert code == EXIT_BAD_INPUT, case
        assert out == "" and len(err.strip().splitlines()) == 1 and "error:" in err, case
    # a truth file gone bad is a user error, not a zero score
    (folder / f"{stems[0]}_AGL.tif").unlink()
    code, _, err = _cli([str(folder), str(pred)], capsys)
    assert code == EXIT_BAD_INPUT and f"{stems[0]}_AGL.tif" in err


@pytest.mark.parametrize("member", ["../{}_AGL.tif", "/tmp/{}_AGL.tif"])
def test_unsafe_archive_member_is_refused(truth, tmp_path, capsys, member):
    folder, stems = truth
    pred = tmp_path / "pred"
    write_predictions(folder, pred, stems)
    archive = tmp_path / "evil.tar.gz"
    evil = f"evil-{uuid.uuid4().hex}"
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(pred.iterdir()):
            tar.add(f, arcname=f.name)
        info = tarfile.TarInfo(member.format(evil))  # add() would strip a leading "/"
        data = (pred / f"{stems[0]}_AGL.tif").read_bytes()
        info.size = len(data)
        tar.addfile(info, io_bytes(data))
    code, _, err = _cli([str(folder), str(archive)], capsys)
    assert code == EXIT_BAD_INPUT and "unsafe" in err
    assert not list(Path("/tmp").glob(f"{evil}*"))


def test_module_entry_point(truth, tmp_path):
    folder, stems = truth
    pred = tmp_path / "pred"
    write_predictions(folder, pred, stems)
    (pred / f"{stems[-1]}_VFLOW.json").unlink()  # an OMA tile
    proc = subprocess.run(
        [sys.executable, "-m", "geopose_ray.score", str(folder), str(pred)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["cities"]["OMA"] == 0.0 and doc["cities"]["ARG"] == pytest.approx(1.0, abs=1e-12)
    assert f"{stems[-1]}_VFLOW.json" in proc.stderr
