"""data.layout: the DrivenData tables become Sample records; bad tables and files are refused.

`make_layout` (also used by test_convert.py) writes a tiny, valid DrivenData layout with the
project's own writers, so the bad-input cases can damage one file at a time.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geopose_ray.constants import CITIES
from geopose_ray.data import io, layout
from geopose_ray.errors import InputError


def make_layout(root: Path, per_city: int = 3, test_per_city: int = 1, size: int = 64, seed: int = 0) -> Path:
    """train/ + test/ + the three CSV files; ids are random 6-char alphanumerics."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(string.ascii_letters + string.digits))
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    train, test, meta = [], [], []
    for city in CITIES:
        for i in range(per_city + test_per_city):
            tile_id = "".join(rng.choice(alphabet, 6))
            stem = f"{city}_{tile_id}"
            split = "train" if i < per_city else "test"
            io.write_rgb_j2k(
                root / split / f"{stem}_RGB.j2k", rng.integers(0, 256, (size, size, 3), np.uint8)
            )
            meta.append((tile_id, city, round(float(rng.uniform(0.3, 0.6)), 4)))
            if split == "test":
                test.append((tile_id, f"{stem}_RGB.j2k"))
                continue
            agl = rng.uniform(0, 40, (size, size))
            agl[rng.random((size, size)) < 0.05] = np.nan
            io.write_agl_cm(root / "train" / f"{stem}_AGL.tif", agl)
            vflow = io.VFlow(scale=float(rng.uniform(0.65, 1.05)), angle=float(rng.uniform(-np.pi, np.pi)))
            io.write_vflow(root / "train" / f"{stem}_VFLOW.json", vflow)
            train.append((tile_id, f"{stem}_AGL.tif", f"{stem}_VFLOW.json", f"{stem}_RGB.j2k"))
    pd.DataFrame(train, columns=["id", "agl", "json", "rgb"]).to_csv(root / "geopose_train.csv", index=False)
    pd.DataFrame(test, columns=["id", "rgb"]).to_csv(root / "geopose_test.csv", index=False)
    pd.DataFrame(meta, columns=["id", "city", "gsd"]).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return make_layout(tmp_path / "data")


def test_load_split_reads_the_tables(data_dir):
    train = layout.load_split(data_dir, "train")
    test = layout.load_split(data_dir, "test")
    meta = pd.read_csv(data_dir / "metadata.csv", dtype=str).set_index("id")
    assert len(train) == 3 * len(CITIES) and len(test) == len(CITIES)
    for s in train + test:
        assert s.city == meta.loc[s.id, "city"] and s.gsd == pytest.approx(float(meta.loc[s.id, "gsd"]))
        assert s.rgb == data_dir / s.split / f"{s.stem}_RGB.j2k" and s.rgb.is_file()
    for s in train:
        assert (
            s.split == "train"
            and s.agl.name == f"{s.stem}_AGL.tif"
            and s.vflow.name == f"{s.stem}_VFLOW.json"
        )
    assert all(s.split == "test" and s.agl is None and s.vflow is None for s in test)
    layout.validate_samples(train + test)


def test_numeric_looking_ids_stay_text_and_group_column_is_read(data_dir):
    train_csv = pd.read_csv(data_dir / "geopose_train.csv", dtype=str)
    meta = pd.read_csv(data_dir / "metadata.csv", dtype=str)
    old = train_csv.loc[0, "id"]
    train_csv.loc[0, "id"] = "001234"
    meta.loc[meta["id"] == old, "id"] = "001234"
    meta["group"] = [f"scene{i % 2}" for i in range(len(meta))]
    train_csv.to_csv(data_dir / "geopose_train.csv", index=False)
    meta.to_csv(data_dir / "metadata.csv", index=False)
    samples = {s.id: s for s in layout.load_split(data_dir, "train")}
    assert "001234" in samples
    assert {s.group for s in samples.values()} == {"scene0", "scene1"}


def test_missing_split_csv_and_unknown_split(data_dir):
    (data_dir / "geopose_test.csv").unlink()
    assert not layout.has_split(data_dir, "test") and layout.has_split(data_dir, "train")
    with pytest.raises(InputError) as e:
        layout.load_split(data_dir, "test")
    assert e.value.path == str(data_dir / "geopose_test.csv")
    with pytest.raises(ValueError):
        layout.load_split(data_dir, "val")


@pytest.mark.parametrize("column", ["agl", "json", "rgb", "id"])
def test_missing_column_names_the_csv(data_dir, column):
    path = data_dir / "geopose_train.csv"
    pd.read_csv(path, dtype=str).drop(columns=[column]).to_csv(path, index=False)
    with pytest.raises(InputError) as e:
        layout.load_split(data_dir, "train")
    assert e.value.path == str(path) and column in e.value.problem


@pytest.mark.parametrize("gsd", ["nan", "inf", "-0.3", "abc", ""])
def test_bad_gsd_names_metadata(data_dir, gsd):
    path = data_dir / "metadata.csv"
    meta = pd.read_csv(path, dtype=str)
    meta.loc[2, "gsd"] = gsd
    meta.to_csv(path, index=False)
    with pytest.raises(InputError) as e:
        layout.load_split(data_dir, "train")
    assert e.value.path == str(path)


def test_empty_split_csv_is_refused(data_dir):
    path = data_dir / "geopose_train.csv"
    path.write_text("id,agl,json,rgb\n")
    with pytest.raises(InputError) as e:
        layout.load_split(data_dir, "train")
    assert e.value.path == str(path)
