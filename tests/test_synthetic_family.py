"""Views per place, per-view GSD, the tall style and the named family of held-out-like sets.

The default set must not move: the digests below were taken from the generator before views,
GSD jitter, crop jitter and styles were parameters. The big family sets are never rendered here.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from geopose_ray.constants import CITIES
from geopose_ray.data.io import read_vflow
from geopose_ray.synthetic import build, family, generate, plan, render, render_oblique
from geopose_ray.synthetic.__main__ import main
from geopose_ray.synthetic.family import FAMILY, FamilySet, check_set, generate_named, names
from geopose_ray.synthetic.measure import displacement_stats
from geopose_ray.synthetic.styles import STYLE_SETS, TALL_STYLES
from geopose_ray.synthetic.tiles import _resampled

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
PLAN_DIGEST = "0355eff6c13d35a2"  # plan(5, 2, 7) before this family existed
PIXELS_DIGEST = "7b66cee2ec8817d1"  # every other tile of plan(3, 1, 0) rendered at 64 px, same


def metadata(out: Path) -> list[dict[str, str]]:
    with open(out / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the default set stays as it was


def test_default_plan_and_pixels_are_unchanged():
    h = hashlib.sha256()
    for t in plan(5, 2, 7):
        h.update(
            f"{t.id} {t.city} {t.split} {t.group} {t.gsd:.4f} {t.scale:.10f} {t.angle:.10f} {t.view}\n".encode()
        )
    assert h.hexdigest()[:16] == PLAN_DIGEST
    h = hashlib.sha256()
    for t in plan(3, 1, 0)[::2]:
        rgb, agl = build.render_tile(t, 64)
        h.update(rgb.tobytes())
        h.update(np.nan_to_num(np.rint(agl * 100), nan=-1).astype(np.int32).tobytes())
    assert h.hexdigest()[:16] == PIXELS_DIGEST


def test_explicit_defaults_write_the_same_files_and_manifest(tmp_path: Path):
    a = generate(tmp_path / "a", size=32, per_city=3, test_per_city=1)
    b = generate(
        tmp_path / "b",
        size=32,
        per_city=3,
        test_per_city=1,
        views=2,
        gsd_jitter=0,
        crop_jitter=0.125,
        style="gentle",
    )
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != build.LOCK)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != build.LOCK)
    assert all((a / rel).read_bytes() == (b / rel).read_bytes() for rel in files)
    manifest = json.loads((a / build.MANIFEST).read_text())
    assert set(manifest) == {"format", "size", "per_city", "test_per_city", "seed", "zoom", "complete"}


def test_a_set_with_other_view_settings_is_regenerated(tmp_path: Path):
    out = generate(tmp_path, size=32, per_city=2, test_per_city=0, views=1)
    assert len({m["group"] for m in metadata(out)}) == 2 * len(CITIES)
    generate(out, size=32, per_city=2, test_per_city=0)  # default views: not the set that is there
    assert len({m["group"] for m in metadata(out)}) == len(CITIES)
    assert "views" not in json.loads((out / build.MANIFEST).read_text())


# ---------------------------------------------------------------- views per place, per-view GSD


@pytest.mark.parametrize("views", [1, 3, 20])
def test_each_place_has_the_given_number_of_train_views(views: int):
    tiles = plan(per_city=7, test_per_city=2, seed=1, views=views)
    groups: dict[str, list] = defaultdict(list)
    for t in tiles:
        groups[t.group].append(t)
    for city in CITIES:
        train = [len(g) for name, g in groups.items() if name.startswith(f"{city}_train")]
        assert sum(train) == 7 and train == [views] * (7 // views) + ([7 % views] if 7 % views else [])
        assert [len(g) for name, g in groups.items() if name.startswith(f"{city}_test")] == [1, 1]
    for g in groups.values():
        assert [t.view for t in g] == list(range(len(g))) and len({t.scene_seed for t in g}) == 1


def test_views_get_their_own_gsd_and_labels_stay_in_range(tmp_path: Path):
    out = generate(tmp_path, size=32, per_city=4, test_per_city=1, views=4, gsd_jitter=0.1, seed=2)
    rows = metadata(out)
    by_group: dict[str, list[float]] = defaultdict(list)
    for m in rows:
        by_group[m["group"]].append(float(m["gsd"]))
    for t in plan(4, 1, 2, views=4, gsd_jitter=0.1):
        assert abs(t.gsd / t.place_gsd - 1) <= 0.1 + 1e-3
        lo, hi = STYLE_SETS["gentle"][t.city].scale
        folder = "train" if t.split == "train" else "truth"
        assert lo <= read_vflow(out / folder / f"{t.stem}_VFLOW.json").scale <= hi  # px/m of the view
    train_groups = [g for name, g in by_group.items() if "_train" in name]
    assert len(train_groups) == len(CITIES) and all(len(g) == 4 and len(set(g)) == 4 for g in train_groups)


def test_a_finer_view_magnifies_about_the_crop_centre():
    rgb = np.zeros((100, 100, 3), np.uint8)
    agl = np.zeros((100, 100), np.float32)
    agl[40:60, 40:60], rgb[40:60, 40:60] = 30.0, 200  # a 20 px roof centred in the crop
    out_rgb, out_agl = _resampled(rgb, agl, (10, 10), 80, 1.25)  # crop 10:90, 1.25 view px per scene px
    rows = np.flatnonzero((out_agl == 30.0).any(1))
    assert rows.size in (24, 25, 26) and abs(rows[0] + rows[-1] - 79) <= 1  # 20 px * 1.25, centred
    assert out_rgb.shape == (80, 80, 3) and out_rgb[40, 40, 0] == pytest.approx(200)


def test_chunked_rendering_equals_one_pass(monkeypatch):
    t = plan(1, 0, 3, views=1, style="tall")[1]
    scene = build.scene_for(t, 64)
    whole = render_oblique(scene.height, scene.albedo, t.scale, t.angle)
    monkeypatch.setattr(render, "MAX_SPLATS", 500)
    parts = render_oblique(scene.height, scene.albedo, t.scale, t.angle)
    assert np.array_equal(whole[0], parts[0]) and np.array_equal(whole[1], parts[1])


def test_bad_view_settings_are_refused(tmp_path: Path):
    for bad in ({"views": 0}, {"gsd_jitter": 0.5}, {"crop_jitter": -0.1}, {"style": "nope"}):
        with pytest.raises(ValueError):
            generate(tmp_path / "x", size=32, per_city=1, **bad)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- the tall style


def test_tall_set_shifts_roofs_by_a_real_share_of_the_tile(tmp_path: Path):
    out = generate(tmp_path, size=128, per_city=2, test_per_city=1, zoom=0.5, style="tall", seed=5)
    stats = displacement_stats(out)
    assert stats["tiles"] == 3 * len(CITIES)
    assert stats["p95"] >= 0.05 and 0.15 <= stats["max"] <= 0.45, stats  # AGL * scale / 128 px
    assert 0.04 <= stats["raised_frac"] <= 0.2, stats  # sparse: ~10 % of pixels above 2 m


def test_tall_styles_keep_real_gsd_and_scale_ranges():
    tops = {city: s.height_max for city, s in TALL_STYLES.items()}
    assert min(tops.values()) >= 30 and max(tops.values()) <= 90 and max(tops, key=tops.get) == "ATL"
    for s in TALL_STYLES.values():
        assert 0.6 <= s.scale[0] < s.scale[1] <= 1.05 and s.density <= 0.1
    assert {c: s.gsd for c, s in TALL_STYLES.items()} == {c: s.gsd for c, s in STYLE_SETS["gentle"].items()}


# ---------------------------------------------------------------- the named family


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_entry_is_valid(name: str):
    spec = FAMILY[name]
    check_set(spec)
    tiles = plan(spec.per_city, spec.test_per_city, spec.seed, spec.views, spec.gsd_jitter, spec.style)
    assert len(tiles) == len(CITIES) * (spec.per_city + spec.test_per_city)
    styles = STYLE_SETS[spec.style]
    reach = max(s.height_max * s.scale[1] for s in styles.values()) * spec.zoom * (1 + spec.gsd_jitter)
    assert 0.05 <= reach / spec.size <= 0.45  # largest possible roof shift, share of the tile


def test_family_split_is_named_and_varied():
    tune, heldout, check = names("tune"), names("heldout"), names("check")
    assert 2 <= len(tune) <= 3 and 3 <= len(heldout) <= 4 and len(check) == 1
    assert sorted(tune + heldout + check) == sorted(FAMILY)
    assert len({s.seed for s in FAMILY.values()} | {0}) == len(FAMILY) + 1  # no shared places
    held = [FAMILY[n] for n in heldout]
    assert {128, 512} <= {s.size for s in held} and min(s.per_city for s in held) <= 12
    assert max(s.per_city for s in held) >= 200 and len({s.views for s in held}) == len(held)
    big = FAMILY[check[0]]
    assert big.size == 2048 and big.per_city <= 2 and big.test_per_city == 1


def test_generate_named_and_cli_family(tmp_path: Path, monkeypatch, capsys):
    tiny = FamilySet("tune", 32, 2, 1, 2, "tall", 77, 0.25, gsd_jitter=0.05)
    monkeypatch.setitem(family.FAMILY, "tiny", tiny)
    out = generate_named("tiny", tmp_path / "named")
    assert json.loads((out / build.MANIFEST).read_text())["style"] == "tall"
    assert main([str(tmp_path / "cli"), "--family", "tiny"]) == 0
    assert "2 train + 1 test" in capsys.readouterr().out
    assert (tmp_path / "cli" / "metadata.csv").read_text() == (out / "metadata.csv").read_text()
    with pytest.raises(ValueError):
        generate_named("nope", tmp_path / "x")
    for argv in (["--family", "tiny", "--size", "64"], ["--family", "nope"], ["--views", "0"]):
        with pytest.raises(SystemExit) as bad:
            main([str(tmp_path / "y"), *argv])
        assert bad.value.code == 2
