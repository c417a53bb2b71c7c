"""Geo-consistent augmentation: the pure vflow maths, and every transform/preset checked against
the oblique renderer (a box building's roof-minus-footprint offset must equal -h * scale' * dir(a'))."""

from __future__ import annotations

import albumentations as A
import numpy as np
import oracles as O
import pytest
from albumentations.augmentations.geometric import functional as fgeometric

from geopose_ray.config import DataConfig
from geopose_ray.data import functional as F
from geopose_ray.data import transforms as T

SIZE = 160  # px, scene side
BUILDING_H = 37.5  # m
SCALE = 0.8  # px/m -> 30 px roof offset
ANGLE = float(np.arctan2(24, -18))  # rad, off-axis; offset (-24, 18) px is whole, so rendering is exact
GSD = 0.5  # m/px
ANGLE_TOL_DEG = 3.0
REL_TOL = 0.03

GEOMETRIC = {  # name -> (factory, draws)
    "hflip": (lambda: O.GeoHorizontalFlip(p=1), 2),
    "vflip": (lambda: O.GeoVerticalFlip(p=1), 2),
    "transpose": (lambda: O.GeoTranspose(p=1), 2),
    "rot90": (lambda: O.GeoRandomRotate90(p=1), 16),
    "d4": (lambda: T.GeoD4(p=1), 48),
    "affine": (
        lambda: T.GeoAffine(rotate=(-180, 180), scale=(0.7, 1.3), translate_percent=(-0.05, 0.05), p=1),
        24,
    ),
}


# --- helpers ---------------------------------------------------------------------------------------


def _angle_diff_deg(a: float, b: float) -> float:
    return abs(np.degrees(np.angle(np.exp(1j * (a - b)))))


def _centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean(), rows.mean()])  # (x, y)


def _compose(*ops: A.BasicTransform, seed: int = 0, **kw) -> A.Compose:
    c = A.Compose(list(ops), additional_targets=dict(T.ADDITIONAL_TARGETS), **kw)
    T.reseed(c, seed)
    return c


def _offset_errors(out: dict, footprint_area: float) -> tuple[float, float, float]:
    """(angle error deg, relative length error, relative gsd error) of a transformed scene."""
    angle, scale, gsd = out["vflow"]
    agl, foot = out["agl"], out["mask"]
    roof = np.abs(agl - BUILDING_H) < 1e-3 * BUILDING_H  # NaN compares False
    fp = foot > 0.5
    measured = _centroid(roof) - _centroid(fp)  # (x, y) px
    expected = -BUILDING_H * scale * F.direction(angle)
    ang = _angle_diff_deg(F.angle_of(measured), F.angle_of(expected))
    length = np.linalg.norm(measured) / np.linalg.norm(expected) - 1
    gsd_measured = GSD * np.sqrt(footprint_area / fp.sum())  # ground area is invariant
    return ang, abs(length), abs(gsd / gsd_measured - 1)


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene() -> dict:
    """One tilted box building on flat textured ground, rendered obliquely."""
    from geopose_ray.synthetic import render_oblique

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    # put the footprint so that the roof/footprint midpoint sits at the image centre
    cx, cy = SIZE / 2 + 0.5 * BUILDING_H * SCALE * F.direction(ANGLE)
    tilt = np.deg2rad(30)
    u = (xx - cx) * np.cos(tilt) + (yy - cy) * np.sin(tilt)
    v = -(xx - cx) * np.sin(tilt) + (yy - cy) * np.cos(tilt)
    footprint = ((np.abs(u) <= 20) & (np.abs(v) <= 12)).astype(np.float32)  # (H, W) ground plane
    height = footprint * BUILDING_H  # (H, W) m
    albedo = rng.uniform(0.2, 0.8, (SIZE, SIZE, 3)).astype(np.float32)
    rgb, agl = render_oblique(height, albedo, SCALE, ANGLE)
    return {"image": rgb, "agl": agl, "mask": footprint, "vflow": np.array([ANGLE, SCALE, GSD])}


def _call(t: A.Compose, scene: dict) -> dict:
    return t(image=scene["image"], agl=scene["agl"], mask=scene["mask"], vflow=scene["vflow"])


# --- functional: pure maths ----------------------------------------------------------------------


def _assert_vflow_close(got: np.ndarray, want: np.ndarray) -> None:
    assert 0 <= got[0] < 2 * np.pi and 0 <= want[0] < 2 * np.pi
    assert _angle_diff_deg(got[0], want[0]) < 1e-6
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-9)


@pytest.mark.parametrize("angle", [*np.linspace(0.05, 2 * np.pi, 9), 0.0, -1.0])
def test_general_form_matches_closed_forms(angle):
    v = np.array([angle, 0.8, 0.4])
    for k in (-1, 0, 1, 2, 3, 5):
        _assert_vflow_close(F.update_vflow(v, F.rot90_matrix(k)), O.rot90_vflow(v, k))
    _assert_vflow_close(F.update_vflow(v, F.hflip_matrix()), O.hflip_vflow(v))
    _assert_vflow_close(F.update_vflow(v, F.vflip_matrix()), O.vflip_vflow(v))
    _assert_vflow_close(F.update_vflow(v, F.transpose_matrix()), O.transpose_vflow(v))
    for phi, s in [(30.0, 1.2), (-75.0, 0.7), (180.0, 1.0)]:
        c, n = np.cos(np.deg2rad(phi)), np.sin(np.deg2rad(phi))
        m = s * np.array([[c, n], [-n, c]])  # counter-clockwise on screen, y down
        _assert_vflow_close(F.update_vflow(v, m), O.rotate_zoom_vflow(v, phi, s))


def test_zoom_magnifies_scale_and_shrinks_gsd():
    out = F.update_vflow(np.array([1.0, 0.8, 0.4]), 1.25 * np.eye(2))
    np.testing.assert_allclose(out, [1.0, 1.0, 0.32])


def _marked(size: int = 9) -> np.ndarray:
    img = np.zeros((size, size), np.uint8)
    img[2, 1] = 1  # (x=1, y=2)
    img[3, 6] = 2  # (x=6, y=3)
    return img


def _displacement(img: np.ndarray) -> np.ndarray:
    p0, p1 = (np.argwhere(img == v)[0][::-1] for v in (1, 2))  # (row, col) -> (x, y)
    return (p1 - p0).astype(float)


@pytest.mark.parametrize(
    ("op", "matrix"),
    [
        *[(lambda x, k=k: np.rot90(x, k), F.rot90_matrix(k)) for k in range(4)],
        (lambda x: x[:, ::-1], F.hflip_matrix()),
        (lambda x: x[::-1], F.vflip_matrix()),
        (lambda x: x.T, F.transpose_matrix()),
        *[(lambda x, e=e: fgeometric.d4(x, e), F.d4_matrix(e)) for e in F.D4_ELEMENTS],
    ],
)
def test_matrices_match_pixel_motion(op, matrix):
    img = _marked()
    np.testing.assert_allclose(_displacement(op(img)), matrix @ _displacement(img))


def test_update_vflow_rejects_bad_input():
    with pytest.raises(ValueError, match="vflow"):
        F.update_vflow(np.array([1.0, 2.0]), np.eye(2))
    with pytest.raises(ValueError, match="singular"):
        F.update_vflow(np.array([1.0, 2.0, 0.5]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="valid"):
        F.d4_matrix("x")


def test_direction_roundtrip():
    for a in np.linspace(0, 2 * np.pi, 13, endpoint=False):
        assert _angle_diff_deg(F.angle_of(F.direction(a)), a) < 1e-9


# --- transforms against the renderer ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_transform_matches_renderer(scene, name):
    factory, draws = GEOMETRIC[name]
    t = _compose(factory(), seed=1, save_applied_params=True)
    area = scene["mask"].sum()
    seen = set()
    for _ in range(draws):
        out = _call(t, scene)
        seen.update(str(p.get("factor", p.get("group_element"))) for _, p in out["applied_transforms"])
        ang, length, gsd = _offset_errors(out, area)
        assert ang < ANGLE_TOL_DEG and length < REL_TOL and gsd < REL_TOL, (
            name,
            out["vflow"],
            ang,
            length,
            gsd,
        )
    assert len(seen) == {"rot90": 4, "d4": 8}.get(name, 1)  # every discrete element was exercised


@pytest.mark.parametrize("photo", list(T.PHOTO_PRESETS))
@pytest.mark.parametrize("geo", list(T.GEO_PRESETS))
def test_presets_match_renderer(scene, geo, photo):
    t = T.build_train_transform(geo, photo, p=1.0, rotate_limit=45, zoom_limit=0.25, seed=2)
    area = scene["mask"].sum()
    for _ in range(4):
        out = _call(t, scene)
        assert out["image"].dtype == np.uint8 and out["image"].shape == scene["image"].shape
        assert out["agl"].dtype == np.float32 and out["agl"].shape == scene["agl"].shape
        ang, length, gsd = _offset_errors(out, area)
        assert ang < ANGLE_TOL_DEG and length < REL_TOL and gsd < REL_TOL, (geo, photo, out["vflow"])


def test_check_rejects_unmodified_vflow_and_inverted_zoom(scene):
    """The renderer check is sharp: a plain flip (vflow untouched) and the inverted zoom rule fail."""
    area = scene["mask"].sum()
    ang, _, _ = _offset_errors(_call(_compose(A.HorizontalFlip(p=1)), scene), area)
    assert ang > 30
    out = _call(_compose(T.GeoAffine(scale=1.3, p=1)), scene)
    inverted = dict(out, vflow=np.array([out["vflow"][0], SCALE / 1.3, GSD * 1.3]))
    _, length, gsd = _offset_errors(inverted, area)
    assert length > 0.2 and gsd > 0.2


# --- labels: NaN nodata, borders, exact values ---------------------------------------------------


def _labelled(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    agl = rng.uniform(1.0, 50.0, (96, 96)).astype(np.float32)  # no zeros anywhere
    agl[40:60, 30:70] = np.nan
    agl[rng.random((96, 96)) < 0.05] = np.nan
    return img, agl, np.isnan(agl).astype(np.float32)


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_nodata_stays_nan_and_values_are_unchanged(name):
    img, agl, nodata = _labelled()
    t = _compose(GEOMETRIC[name][0](), seed=3)
    for _ in range(6):
        out = t(image=img, agl=agl, mask=nodata, vflow=np.array([0.3, 1.0, 0.5]))
        a, m = out["agl"], out["mask"]
        assert np.isnan(a[m == 1]).all()  # nodata stays nodata
        assert np.isfinite(a[m == 0]).all()  # data stays data
        assert np.isin(a[np.isfinite(a)], agl[np.isfinite(agl)]).all()  # nearest: values copied exactly
        assert not (a == 0).any()  # no border or interpolation zeros


def test_rotation_border_is_nan_in_agl_and_zero_in_image():
    img, agl, _ = _labelled()
    agl = np.nan_to_num(agl, nan=7.0)
    out = _compose(T.GeoAffine(rotate=45, p=1))(image=img, agl=agl, vflow=np.array([0.3, 1.0, 0.5]))
    corners = (slice(0, 5), slice(0, 5))
    assert np.isnan(out["agl"][corners]).all()
    assert (out["image"][corners] == 0).all()


@pytest.mark.parametrize("photo", list(T.PHOTO_PRESETS))
def test_photometric_presets_leave_labels_untouched(photo):
    img, agl, nodata = _labelled()
    vflow = np.array([0.3, 1.0, 0.5])
    t = T.build_train_transform("none", photo, p=1.0, rotate_limit=0, zoom_limit=0, seed=4)
    changed = False
    for _ in range(3):
        out = t(image=img, agl=agl, mask=nodata, vflow=vflow)
        np.testing.assert_array_equal(out["agl"], agl)
        np.testing.assert_array_equal(out["mask"], nodata)
        np.testing.assert_array_equal(out["vflow"], vflow)
        assert out["image"].dtype == np.uint8 and out["image"].shape == img.shape
        changed |= not np.array_equal(out["image"], img)
    assert changed == (photo != "none")


# --- randomness, registries, config ----------------------------------------------------------------


def _stream(t: A.Compose, n: int = 5) -> list[np.ndarray]:
    img, agl, _ = _labelled()
    outs = [t(image=img, agl=agl, vflow=np.array([0.3, 1.0, 0.5])) for _ in range(n)]
    return [np.concatenate([o["image"].ravel(), np.nan_to_num(o["agl"]).ravel(), o["vflow"]]) for o in outs]


def test_seed_is_deterministic_and_reseed_separates_workers():
    build = lambda seed: T.build_train_transform("full", "heavy", 0.5, 30, 0.2, seed=seed)  # noqa: E731
    a, b, c = _stream(build(7)), _stream(build(7)), _stream(build(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    worker = build(7)  # a forked worker holds a copy of the parent's state; reseed gives its own
    T.reseed(worker, 123)
    assert not all(np.array_equal(x, y) for x, y in zip(a, _stream(worker)))


def test_children_draw_independently():
    """albumentations' own Compose(seed=) seeds every child alike (equal-p ops fire together)."""
    t = _compose(O.GeoHorizontalFlip(p=0.5), O.GeoVerticalFlip(p=0.5), seed=5, save_applied_params=True)
    img, agl, _ = _labelled()
    combos = {tuple(n for n, _ in t(image=img, agl=agl)["applied_transforms"]) for _ in range(40)}
    assert len(combos) == 4


def test_preset_set_random_seed_keeps_children_independent():
    """The dataset may call albumentations' own `set_random_seed`; with plain A.Compose every child
    would get the same seed, so equal-p ops decide alike on the first call (all or none)."""
    t = T.build_train_transform("d4", "light", p=0.5, rotate_limit=0, zoom_limit=0)
    t.save_applied_params = True
    img, agl, _ = _labelled()

    def first_call(seed: int) -> int:
        t.set_random_seed(seed)
        return len(t(image=img, agl=agl)["applied_transforms"])

    fired = [first_call(seed) for seed in range(60)]  # 3 ops with p = 0.5 each
    assert fired == [first_call(seed) for seed in range(60)]  # reproducible
    assert sum(0 < n < 3 for n in fired) > 20  # some but not all fired: the decisions are independent


def test_unknown_preset_names_list_valid_ones():
    with pytest.raises(ValueError, match="'affine'"):
        T.build_train_transform("spin", "light", 0.5, 10, 0.1)
    with pytest.raises(ValueError, match="'heavy'"):
        T.build_train_transform("d4", "loud", 0.5, 10, 0.1)
    with pytest.raises(ValueError, match="aug_prob"):
        T.build_train_transform("d4", "light", 1.5, 10, 0.1)


def test_from_config():
    cfg = DataConfig(geo_aug="d4", photo_aug="none", aug_prob=1.0)
    t = T.build_train_transform_from_config(cfg, seed=0)
    img, agl, _ = _labelled()
    vflows = {
        tuple(np.round(t(image=img, agl=agl, vflow=np.array([0.3, 1.0, 0.5]))["vflow"], 6)) for _ in range(16)
    }
    assert len(vflows) > 1  # the geometric preset is live
    with pytest.raises(ValueError, match="valid"):
        T.build_train_transform_from_config(DataConfig(geo_aug="bogus"))
