"""data.io: exact round trips, units, windowed reads, bad files -> InputError, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geopose_ray.data import io
from geopose_ray.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _rgb(rng: np.random.Generator, h: int = 70, w: int = 90) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_j2k_is_lossless_and_windowed_read_matches(tmp_path):
    rgb = _rgb(np.random.default_rng(0))
    path = tmp_path / "ARG_abcdef_RGB.j2k"
    io.write_rgb_j2k(path, rgb)
    with rasterio.open(path) as ds:
        assert ds.driver == "JP2OpenJPEG"
    np.testing.assert_array_equal(io.read_rgb(path), rgb)
    np.testing.assert_array_equal(io.read_rgb(path, Window(7, 11, 40, 30)), rgb[11:41, 7:47])


@pytest.mark.parametrize("compress", [None, "deflate"])
def test_tiled_tifs_round_trip_and_are_tiled(tmp_path, compress):
    rng = np.random.default_rng(1)
    rgb, cm = _rgb(rng, 300, 280), rng.integers(0, 65536, (300, 280)).astype(np.uint16)
    io.write_rgb_tiled(tmp_path / "rgb.tif", rgb, compress=compress)
    io.write_agl_tiled(tmp_path / "agl.tif", cm, compress=compress)
    for name in ("rgb.tif", "agl.tif"):
        with rasterio.open(tmp_path / name) as ds:
            assert ds.block_shapes[0] == (256, 256)
            assert (ds.compression is not None) == (compress is not None)
    window = Window(250, 240, 30, 60)  # crosses block borders
    np.testing.assert_array_equal(io.read_rgb(tmp_path / "rgb.tif"), rgb)
    np.testing.assert_array_equal(io.read_rgb(tmp_path / "rgb.tif", window), rgb[240:300, 250:280])
    np.testing.assert_array_equal(io.read_agl_cm(tmp_path / "agl.tif"), cm)
    full = io.read_agl(tmp_path / "agl.tif")
    np.testing.assert_array_equal(io.read_agl(tmp_path / "agl.tif", window), full[240:300, 250:280])


def test_agl_units_rounding_clipping_and_nodata(tmp_path):
    agl_m = np.array([[0.0, 1.234, 1.236, np.nan], [-3.0, 655.35, 1e6, np.inf]], dtype=np.float32)
    path = tmp_path / "x_AGL.tif"
    io.write_agl_cm(path, agl_m)
    with rasterio.open(path) as ds:
        raw = ds.read(1)
        assert ds.dtypes[0] == "uint16" and ds.nodata == 65535 and ds.compression is not None
    np.testing.assert_array_equal(raw, [[0, 123, 124, 65535], [0, 65534, 65534, 65535]])
    back = io.read_agl(path)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back[0, :3], [0.0, 1.23, 1.24], atol=1e-6)
    assert np.isnan(back[0, 3]) and np.isnan(back[1, 3])
    np.testing.assert_allclose(back[1, :3], [0.0, 655.34, 655.34], atol=1e-4)


def test_vflow_json_is_px_per_cm_and_memory_px_per_m(tmp_path):
    path = tmp_path / "v.json"
    io.write_vflow(path, io.VFlow(scale=0.85, angle=-2.5))
    doc = json.loads(path.read_text())
    assert doc["scale"] == pytest.approx(0.0085) and doc["angle"] == -2.5
    back = io.read_vflow(path)
    assert back.scale == pytest.approx(0.85) and back.angle == -2.5


@pytest.mark.parametrize(
    "text",
    [
        '{"angle": 1.0}',
        '{"scale": 0.01}',
        '{"scale": NaN, "angle": 1}',
        '{"scale": 0.01, "angle": Infinity}',
        '{"scale": "0.01", "angle": 1}',
        '{"scale": true, "angle": 1}',
        "[0.01, 1]",
        '{"scale": 0.01,',
    ],
)
def test_bad_vflow_raises_input_error_naming_file(tmp_path, text):
    path = tmp_path / "ARG_abcdef_VFLOW.json"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        io.read_vflow(path)
    assert e.value.path == str(path)


def _bad_rasters(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(2)
    good_j2k, good_tif = tmp_path / "good.j2k", tmp_path / "good.tif"
    io.write_rgb_j2k(good_j2k, _rgb(rng))
    io.write_agl_cm(good_tif, rng.uniform(0, 30, (70, 90)))
    raw_j2k, raw_tif = good_j2k.read_bytes(), good_tif.read_bytes()
    cases = {
        "missing": (tmp_path / "nope.tif", "agl"),
        "j2k_garbage_header": (tmp_path / "garbage.j2k", "rgb"),
        "j2k_truncated": (tmp_path / "trunc.j2k", "rgb"),
        "tif_truncated": (tmp_path / "trunc.tif", "agl"),
        "agl_float32": (tmp_path / "float.tif", "agl"),
        "rgb_one_band": (tmp_path / "gray.tif", "rgb"),
    }
    cases["j2k_garbage_header"][0].write_bytes(bytes(64) + raw_j2k[64:])
    cases["j2k_truncated"][0].write_bytes(raw_j2k[: len(raw_j2k) // 2])
    cases["tif_truncated"][0].write_bytes(raw_tif[: len(raw_tif) - 50])
    profile = {"driver": "GTiff", "width": 90, "height": 70, "count": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(cases["agl_float32"][0], "w", dtype="float32", **profile) as ds:
            ds.write(np.ones((1, 70, 90), np.float32))
        with rasterio.open(cases["rgb_one_band"][0], "w", dtype="uint8", **profile) as ds:
            ds.write(np.ones((1, 70, 90), np.uint8))
    return cases


def test_bad_rasters_raise_input_error_naming_file(tmp_path):
    for name, (path, kind) in _bad_rasters(tmp_path).items():
        readers = (io.read_rgb, io.probe_rgb) if kind == "rgb" else (io.read_agl, io.probe_agl)
        for reader in readers:
            with pytest.raises(InputError) as e:
                reader(path)
            assert e.value.path == str(path), (name, reader.__name__)


def test_reads_and_writes_emit_no_georeference_warning(tmp_path):
    rgb = _rgb(np.random.default_rng(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        io.write_rgb_j2k(tmp_path / "a.j2k", rgb)
        io.write_rgb_tiled(tmp_path / "a.tif", rgb)
        io.write_agl_cm(tmp_path / "b.tif", np.zeros((70, 90)))
        io.read_rgb(tmp_path / "a.j2k")
        io.read_rgb(tmp_path / "a.tif", Window(0, 0, 8, 8))
        io.read_agl(tmp_path / "b.tif")
        io.probe_rgb(tmp_path / "a.j2k")


_WRITER = """
import sys, numpy as np
from pathlib import Path
from geopose_ray.data import io
out = Path(sys.argv[1])
rgb = np.full((3000, 3000, 3), 7, np.uint8)
for i in range(1000):
    io.write_rgb_tiled(out / f"f{i:03d}_RGB.tif", rgb)
"""


@pytest.mark.fault
def test_killed_write_leaves_no_file_under_its_final_name(tmp_path):
    """SIGKILL a process while it is writing: every file under a final name is complete."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
    deadline = time.monotonic() + 60
    try:
        while not list(tmp_path.glob(".tmp-*")) or len(list(tmp_path.glob("f*.tif"))) < 1:
            assert time.monotonic() < deadline and proc.poll() is None, "writer never started a second file"
            time.sleep(0.002)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(tmp_path.glob(".tmp-*")), "the kill should have interrupted a write"
    finals = sorted(tmp_path.glob("f*.tif"))
    assert finals
    for path in finals:
        rgb = io.read_rgb(path)
        assert rgb.shape == (3000, 3000, 3) and (rgb == 7).all()


def test_local_reads_and_writes_build_no_cloud_session_with_aws_credentials_set(tmp_path, monkeypatch):
    """With AWS credentials in the environment (a cluster writing to s3://), rasterio builds a
    boto3 session for every call made outside an Env, which slows whole epochs
    (docs/BENCHMARKS.md, 'Figures moved from code comments')."""
    from rasterio import session

    built = []
    fake = staticmethod(lambda *a, **k: built.append(1) or session.DummySession())
    monkeypatch.setattr(session.Session, "from_environ", fake)  # where rasterio builds the boto3 one
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    agl = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 100
    io.write_agl_tiled(tmp_path / "a.tif", io.agl_m_to_cm(agl))
    out = io.read_agl(tmp_path / "a.tif", Window(0, 0, 32, 32))
    assert out.shape == (32, 32) and built == []
    with rasterio.open(tmp_path / "a.tif") as ds:  # the trap itself: a read outside any Env
        ds.read(1, window=Window(0, 0, 8, 8))
    assert built, "rasterio no longer builds a session per call: the guard may be moot"
