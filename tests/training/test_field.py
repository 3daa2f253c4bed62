"""The field scenario of ``csist simulate``: every rule, the files, determinism, the flags."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.special import erf

from service.science import physics
from training import data, field, simulate
from training.field import FieldParams


def _run(out: Path, *extra: str, n: int = 6, seed: int = 0) -> int:
    return simulate.main(
        ["--scenario", "field", "--out", str(out), "--trajectories", str(n), "--seed", str(seed), "--quiet", *extra]
    )


def _params(*flags: str) -> FieldParams:
    """FieldParams exactly as the command line builds them."""
    return field.params_from_args(simulate.build_parser().parse_args(["--out", "x", "--scenario", "field", *flags]))


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _scenes(params: FieldParams, n: int, seed: int = 0) -> list[field.FieldTrajectory]:
    return [field.sample_field_trajectory(ss, params)[0] for ss in field.trajectory_seeds(seed, n)]


@pytest.fixture(scope="module")
def mixed() -> list[field.FieldTrajectory]:
    """300 trajectories with every default range."""
    return _scenes(FieldParams(), 300, seed=42)


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_same_bytes(tmp_path):
    flags = ("--bit-depth", "8,16", "--geometry", "mixed")
    assert _run(tmp_path / "a", *flags) == 0
    assert _run(tmp_path / "b", *flags) == 0
    first = _hashes(tmp_path / "a")
    assert len(first) == 1 + 3 + 2 * 20 * 6  # meta, conditions per split, frames
    assert _hashes(tmp_path / "b") == first
    assert _run(tmp_path / "c", *flags, seed=1) == 0
    other = _hashes(tmp_path / "c")
    assert other.keys() == first.keys() and sum(other[k] != first[k] for k in first if k.endswith(".xml")) == 120


def test_trajectory_does_not_depend_on_count():
    p = FieldParams()
    few = [field.sample_field_trajectory(s, p)[0] for s in field.trajectory_seeds(5, 3)]
    many = [field.sample_field_trajectory(s, p)[0] for s in field.trajectory_seeds(5, 40)[:3]]
    for a, b in zip(few, many):
        np.testing.assert_array_equal(a.targets, b.targets)
        np.testing.assert_array_equal(a.background, b.background)
        assert a.conditions == b.conditions


def test_fixing_one_nuisance_keeps_the_others():
    """Each nuisance has its own stream: two slices of one seed differ only where asked."""
    flat = _scenes(_params("--background", "flat", "--pedestal", "30"), 20)
    clutter = _scenes(_params("--background", "clutter", "--clutter-std", "25", "--pedestal", "30"), 20)
    for a, b in zip(flat, clutter):
        np.testing.assert_array_equal(a.targets[..., :2], b.targets[..., :2])
        # "sat" depends on the background's headroom: the same SNR quantile, another top
        qa = np.log(np.array(a.conditions["peak_snr"]) / 5) / np.log(
            (255 - a.background.max()) / a.conditions["snr_noise"] / 5
        )
        qb = np.log(np.array(b.conditions["peak_snr"]) / 5) / np.log(
            (255 - b.background.max()) / b.conditions["snr_noise"] / 5
        )
        np.testing.assert_allclose(qa, qb, atol=1e-9)
        assert (a.psf_sigma, a.noise, a.bit_depth) == (b.psf_sigma, b.noise, b.bit_depth)
        np.testing.assert_array_equal(a.defects, b.defects)
        assert a.conditions["background"]["kind"] == "flat" and b.conditions["background"]["kind"] == "clutter"
    a, b = (_scenes(_params("--background", kind, "--snr", "5,50"), 5) for kind in ("flat", "edge"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.targets, y.targets)


# --- backgrounds --------------------------------------------------------------------------------


def _background(*flags: str, n: int = 40, seed: int = 3) -> list[tuple[np.ndarray, dict]]:
    p = _params(*flags)
    return [field.sample_background(np.random.default_rng(s), p) for s in np.random.SeedSequence(seed).spawn(n)]


def test_flat_background():
    for bg, info in _background("--background", "flat", "--pedestal", "30"):
        assert info == {"kind": "flat", "pedestal": 30.0}
        assert np.all(bg == 30.0)
    levels = [info["pedestal"] for _, info in _background("--background", "flat", n=200)]
    assert 0 <= min(levels) < 15 and 135 < max(levels) <= 150


def test_ramp_background():
    x, y = np.meshgrid(np.arange(11.0), np.arange(11.0))
    design = np.column_stack([np.ones(121), x.ravel(), y.ravel()])
    angles = []
    for bg, info in _background("--background", "ramp", "--ramp", "10,60"):
        assert bg.min() == pytest.approx(10.0, abs=1e-9) and bg.max() == pytest.approx(60.0, abs=1e-9)
        assert (info["low"], info["high"]) == (10.0, 60.0)
        coef, *_ = np.linalg.lstsq(design, bg.ravel(), rcond=None)
        np.testing.assert_allclose(design @ coef, bg.ravel(), atol=1e-9)  # a plane
        slope = np.degrees(np.arctan2(coef[2], coef[1])) % 360
        assert min(abs(slope - info["angle_deg"]), 360 - abs(slope - info["angle_deg"])) < 1e-6  # rises along theta
        angles.append(info["angle_deg"])
    assert np.ptp(angles) > 180
    for bg, info in _background("--background", "ramp", "--pedestal", "20,40", "--ramp-rise", "5,60"):
        assert 20 <= info["low"] <= 40 and bg.min() == pytest.approx(info["low"], abs=1e-9)
        assert 5 - 1e-9 <= bg.max() - bg.min() <= 60 + 1e-9


@pytest.mark.parametrize("std", [2.0, 10.0, 25.0])
def test_clutter_background_has_the_requested_local_std(std):
    neighbour_corr = []
    for bg, info in _background(
        "--background", "clutter", "--clutter-std", str(std), "--pedestal", "150", "--clutter-scale", "2"
    ):
        assert bg.std() == pytest.approx(std, rel=1e-9)
        assert bg.mean() == pytest.approx(150.0, abs=1e-9) and info["mean"] == pytest.approx(150.0)
        neighbour_corr.append(np.corrcoef(bg[:, :-1].ravel(), bg[:, 1:].ravel())[0, 1])
    assert np.mean(neighbour_corr) > 0.6  # smooth, not white
    for bg, info in _background("--background", "clutter", "--clutter-std", "25", "--pedestal", "0"):
        assert bg.min() == pytest.approx(0.0, abs=1e-9) and bg.std() == pytest.approx(25.0)  # raised, not clipped
        assert info["mean"] == pytest.approx(bg.mean())


def test_edge_background():
    x, y = np.meshgrid(np.arange(11.0), np.arange(11.0))
    for bg, info in _background(
        "--background", "edge", "--pedestal", "40", "--edge-contrast", "50", "--edge-blur", "0.3,1"
    ):
        theta = np.radians(info["angle_deg"])
        d = (x - info["point"][0]) * np.cos(theta) + (y - info["point"][1]) * np.sin(theta)
        b = info["blur"]
        assert 0.3 <= b <= 1.0 and (info["low"], info["high"]) == (40.0, 90.0)
        assert np.all(np.abs(bg[d < -3 * b] - 40.0) < 0.0014 * 50)
        assert np.all(np.abs(bg[d > 3 * b] - 90.0) < 0.0014 * 50)
        np.testing.assert_allclose(bg, 40 + 50 * 0.5 * (1 + erf(d / (b * np.sqrt(2)))), atol=1e-9)
        assert np.all(np.abs(np.array(info["point"]) - 5.0) <= 11 / 4)
    sharp, info = _background("--background", "edge", "--edge-blur", "0", n=1)[0]
    assert set(np.unique(sharp)) <= {info["low"], info["high"], (info["low"] + info["high"]) / 2}


def test_mixed_backgrounds_and_defects(mixed):
    kinds = [t.conditions["background"]["kind"] for t in mixed]
    for k in field.BACKGROUNDS:
        assert abs(kinds.count(k) / len(kinds) - 0.25) < 0.08
    counts = np.array([len(t.defects) for t in mixed])
    assert set(counts) == {0, 1, 2}
    values = np.concatenate([t.defects[:, 2] for t in mixed if len(t.defects)])
    hot = values[values > 0]
    assert np.all((values == 0) | ((values >= np.rint(0.5 * 255)) & (values <= 255)))
    assert 0.3 < len(hot) / len(values) < 0.7
    for t in mixed:
        assert len({(int(a), int(b)) for a, b, _ in t.defects}) == len(t.defects)  # distinct pixels


def test_defects_are_stuck_in_the_images():
    p = _params("--bad-pixels", "3", "--noise", "4")
    for ss in field.trajectory_seeds(2, 5):
        traj, rng = field.sample_field_trajectory(ss, p)
        img = field.render(traj, rng, p.size)
        for x, y, v in traj.defects:
            assert np.all(img[:, int(y), int(x)] == v)


# --- sensor -------------------------------------------------------------------------------------


def test_sensor_ranges(mixed):
    psf = np.array([t.psf_sigma for t in mixed])
    noise = np.array([t.noise for t in mixed])
    assert 0.4 <= psf.min() < 0.45 and 0.65 < psf.max() <= 0.7
    assert 0 <= noise.min() < 0.3 and 4.7 < noise.max() <= 5
    assert {t.bit_depth for t in mixed} == {8}
    fixed = _scenes(_params("--psf-sigma", "0.6", "--noise", "2"), 5)
    assert all(t.psf_sigma == 0.6 and t.noise == 2.0 for t in fixed)


def test_noise_is_gaussian_with_the_drawn_sigma():
    p = _params("--noise", "3", "--float", "--bad-pixels", "0")
    resid = []
    for ss in field.trajectory_seeds(1, 10):
        traj, rng = field.sample_field_trajectory(ss, p)
        resid.append(field.render(traj, rng, p.size, float_out=True) - field.clean_frames(traj, p.size))
    resid = np.concatenate(resid)
    assert abs(resid.mean()) < 0.1 and resid.std() == pytest.approx(3.0, rel=0.05)


# --- geometry -----------------------------------------------------------------------------------


def _check_group(traj: field.FieldTrajectory, p: FieldParams) -> None:
    c = traj.conditions
    pos = traj.targets[..., :2]  # (T, K, 2)
    k = pos.shape[1]
    assert p.targets[0] <= k <= p.targets[1] and c["targets"] == k
    lo, hi = p.margin - 0.5, p.size - 0.5 - p.margin
    assert pos.min() >= lo - 1e-9 and pos.max() <= hi + 1e-9
    if k > 1:
        gaps = np.linalg.norm(pos[:, :, None] - pos[:, None], axis=-1)[:, ~np.eye(k, dtype=bool)]
        assert gaps.min() >= p.min_separation - 1e-12
        assert c["closest_pair"] == pytest.approx(gaps.min())
    radius = c["group_radius"]
    assert radius >= max(p.group_radius[0], field.min_radius(c["geometry"], k, p.min_separation)) - 1e-12
    first = np.linalg.norm(pos[0] - np.array(c["centre_start"]), axis=1)
    assert first.max() <= radius + 1e-9
    v = np.array(c["velocity"])
    assert p.velocity[0] - 1e-12 <= np.linalg.norm(v) <= p.velocity[1] + 1e-12
    drift = np.array(c["target_drift"])
    assert np.all(np.linalg.norm(drift, axis=1) <= p.target_drift[1] + 1e-12)
    T = pos.shape[0]
    expect = (
        np.array(c["centre_start"])
        + (pos[0] - np.array(c["centre_start"]))[None]
        + np.arange(T)[:, None, None] * (v + drift[None])
    )
    np.testing.assert_allclose(pos, expect, atol=1e-9)  # straight lines: group velocity + own drift
    np.testing.assert_array_equal(traj.targets[..., 2], np.broadcast_to(traj.targets[0, :, 2], traj.targets.shape[:2]))


def test_random_geometry(mixed):
    p = FieldParams()
    for t in mixed:
        _check_group(t, p)
    ks = np.array([t.targets.shape[1] for t in mixed])
    assert set(ks) == set(range(1, 9))
    closest = [t.conditions["closest_pair"] for t in mixed if t.conditions["closest_pair"] is not None]
    assert min(closest) < 0.28  # targets really do come close
    starts = np.array([t.targets[0, :, :2].mean(axis=0) for t in mixed])
    assert starts.min() < 2 and starts.max() > 8  # anywhere in the patch


def test_tight_groups_and_other_geometries():
    p = _params(
        "--geometry",
        "mixed",
        "--targets",
        "8",
        "--group-radius",
        "0.1",
        "--min-separation",
        "0.3",
        "--velocity",
        "0.1",
        "--target-drift",
        "0.005",
    )
    scenes = _scenes(p, 60, seed=8)
    assert {t.conditions["geometry"] for t in scenes} == set(field.GEOMETRIES)
    for t in scenes:
        _check_group(t, p)
        assert t.conditions["group_radius"] == pytest.approx(field.min_radius(t.conditions["geometry"], 8, 0.3))
    for t in _scenes(_params("--geometry", "line", "--targets", "3-6", "--target-drift", "0"), 20):
        off = t.targets[0, :, :2] - t.targets[0, :, :2].mean(axis=0)
        assert np.linalg.matrix_rank(off, tol=1e-9) == 1  # collinear
        gaps = np.linalg.norm(np.diff(off[np.argsort(off @ (off[-1] - off[0]))], axis=0), axis=1)
        np.testing.assert_allclose(gaps, gaps[0], atol=1e-9)  # evenly spaced
    for t in _scenes(_params("--geometry", "cross", "--targets", "2-4", "--target-drift", "0"), 20):
        off = t.targets[0, :, :2] - np.array(t.conditions["centre_start"])
        r = np.linalg.norm(off, axis=1)
        np.testing.assert_allclose(r, r[0], atol=1e-9)
        units = np.round(off / r[:, None], 9)
        assert len({tuple(u) for u in units}) == len(units)
        assert all(tuple(abs(u)) in {(1.0, 0.0), (0.0, 1.0)} for u in units)


# --- brightness ---------------------------------------------------------------------------------


def test_unit_peak():
    for sigma in (0.4, 0.5, 0.7):
        assert field.unit_peak(11, sigma) == pytest.approx(erf(0.5 / (sigma * np.sqrt(2))) ** 2, rel=1e-12)


# --- optics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, beta", [("airy", None), ("moffat", 2.5), ("moffat", 4.5)])
def test_psf_shapes_hold_unit_flux_around_the_gaussian_core(shape, beta):
    r = np.linspace(0.0, 400.0, 2_000_001)
    profile = field.psf_profile(r, 0.5, shape, beta)
    flux = np.sum(2 * np.pi * r * profile) * (r[1] - r[0])
    assert flux == pytest.approx(1.0, abs=2e-3)  # the Airy's r^-3 wings leave a little past 400 px
    half = r[np.argmax(profile < profile[0] / 2)]  # half maximum, px
    expect = 2.3548 * 0.5 / 2 if shape == "moffat" else 0.514 * 0.5 / field.AIRY_CORE
    assert half == pytest.approx(expect, rel=2e-3)  # the Moffat's FWHM is the Gaussian's; the Airy's 1.029 lambda N
    img = field.psf_response([[20.3, 19.8, 100.0]], 41, 0.5, shape, beta)
    assert img.sum() == pytest.approx(100.0 * np.sum(2 * np.pi * r * profile * (r < 20)) * (r[1] - r[0]), rel=0.02)
    assert np.unravel_index(img.argmax(), img.shape) == (20, 20)
    gauss = physics.pixel_response([[20.3, 19.8, 100.0]], 41, 0.5)
    assert img.max() < gauss.max() and img[20, 28] > 10 * gauss[20, 28]  # the same core, lower, with wings


def test_gaussian_optics_are_the_forward_model_and_shapes_keep_the_other_draws():
    np.testing.assert_array_equal(
        field.psf_response([[5.2, 4.9, 230.0], [5.6, 5.1, 220.0]], 11, 0.6),
        physics.pixel_response([[5.2, 4.9, 230.0], [5.6, 5.1, 220.0]], 11, 0.6),
    )
    scenes = {shape: _scenes(_params("--psf-shape", shape, "--snr", "5,50"), 8) for shape in field.PSF_SHAPES}
    for g, a, m in zip(*scenes.values()):
        np.testing.assert_array_equal(g.targets[..., :2], a.targets[..., :2])
        np.testing.assert_array_equal(g.background, m.background)
        assert g.psf_sigma == a.psf_sigma == m.psf_sigma and g.noise == a.noise == m.noise
        assert (g.psf_shape, a.psf_shape, m.psf_shape) == field.PSF_SHAPES
        assert g.moffat_beta is None and a.moffat_beta is None and 2.5 <= m.moffat_beta <= 4.5
        assert m.conditions["psf_shape"] == "moffat" and m.conditions["moffat_beta"] == m.moffat_beta
        # the peak SNR is the shaped PSF's: a wider PSF needs more flux for the same peak
        np.testing.assert_allclose(a.conditions["peak_snr"], g.conditions["peak_snr"], rtol=1e-12)
        assert np.all(a.targets[0, :, 2] > g.targets[0, :, 2])
        np.testing.assert_allclose(
            a.conditions["peak"], a.targets[0, :, 2] * field.unit_peak(11, a.psf_sigma, "airy"), rtol=1e-12
        )
        clean = field.clean_frames(a, 11)
        np.testing.assert_allclose(
            clean[3], a.background + field.psf_response(a.targets[3], 11, a.psf_sigma, "airy"), rtol=1e-12
        )
    shapes = {t.psf_shape for t in _scenes(_params("--psf-shape", "mixed"), 40)}
    assert shapes == set(field.PSF_SHAPES)
    assert {t.psf_shape for t in _scenes(FieldParams(), 20)} == {"gaussian"}


def test_jitter_and_scintillation_move_and_scale_each_frame_and_keep_the_other_draws():
    plain = _scenes(_params("--velocity", "0.05", "--target-drift", "0"), 30)
    turb = _scenes(
        _params("--velocity", "0.05", "--target-drift", "0", "--jitter", "0.1", "--scintillation", "0.2"), 30
    )
    shifts, gains = [], []
    for p, t in zip(plain, turb, strict=True):
        np.testing.assert_array_equal(p.background, t.background)
        assert p.psf_sigma == t.psf_sigma and p.noise == t.noise
        assert p.conditions["jitter"] == 0.0 and t.conditions["jitter"] == 0.1
        assert t.conditions["scintillation"] == 0.2
        d = t.targets[..., :2] - p.targets[..., :2]  # (T, K, 2): one shift per frame for the group
        np.testing.assert_allclose(d, np.broadcast_to(d[:, :1], d.shape), atol=1e-12)
        shifts.append(d[:, 0])
        gains.append(t.targets[..., 2] / p.targets[..., 2])
    assert np.std(np.concatenate(shifts)) == pytest.approx(0.1, rel=0.1)
    assert np.std(np.concatenate([g.ravel() for g in gains])) == pytest.approx(0.2, rel=0.1)
    # without them a straight track of constant flux, as before
    for p in plain:
        np.testing.assert_allclose(np.diff(p.targets[..., :2], 2, axis=0), 0.0, atol=1e-12)
        np.testing.assert_array_equal(p.targets[..., 2], np.broadcast_to(p.targets[0, :, 2], p.targets.shape[:2]))


def test_flicker_moves_each_frames_level_and_keeps_the_other_draws():
    plain = _scenes(_params("--pedestal", "50"), 30)
    flick = _scenes(_params("--pedestal", "50", "--flicker", "3"), 30)
    levels = []
    for p, f in zip(plain, flick, strict=True):
        assert p.levels is None and f.conditions["flicker"] == 3.0
        np.testing.assert_array_equal(p.targets, f.targets)
        diff = field.clean_frames(f, 11) - field.clean_frames(p, 11)  # (T, 11, 11): one level per frame
        np.testing.assert_allclose(diff, np.broadcast_to(f.levels[:, None, None], diff.shape), atol=1e-9)
        levels.append(f.levels)
    assert np.std(np.concatenate(levels)) == pytest.approx(3.0, rel=0.1)


def test_snr_range(mixed):
    snr, logs = [], []
    for t in mixed:
        c = t.conditions
        ref = max(t.noise, field.SNR_NOISE_FLOOR)
        assert c["snr_noise"] == ref
        peak = np.array(c["peak"])
        np.testing.assert_allclose(peak, t.targets[0, :, 2] * field.unit_peak(11, t.psf_sigma), rtol=1e-12)
        np.testing.assert_allclose(np.array(c["peak_snr"]), peak / ref, rtol=1e-12)
        top = max(5.0, (255 - t.background.max()) / ref)
        assert np.all(np.array(c["peak_snr"]) >= 5 - 1e-9) and np.all(np.array(c["peak_snr"]) <= top + 1e-9)
        logs += list((np.log(c["peak_snr"]) - np.log(5)) / max(np.log(top / 5), 1e-12))
        snr += c["peak_snr"]
        np.testing.assert_array_equal(c["brightness"], t.targets[0, :, 2])
    logs = np.array(logs)
    assert abs(logs.mean() - 0.5) < 0.05  # log-uniform between the ends
    assert min(snr) < 5.5 and max(snr) > 100


def test_fixed_snr_and_flux_range():
    for t in _scenes(_params("--snr", "10"), 20):
        np.testing.assert_allclose(t.conditions["peak_snr"], 10.0, rtol=1e-12)
    flux = np.concatenate([t.targets[0, :, 2] for t in _scenes(_params("--brightness", "60,250"), 50)])
    assert flux.min() >= 60 and flux.max() <= 250 and np.ptp(flux) > 150


def test_saturating_targets_reach_full_scale():
    p = _params(
        "--background",
        "flat",
        "--pedestal",
        "20",
        "--snr",
        "sat",
        "--targets",
        "1",
        "--noise",
        "0",
        "--bad-pixels",
        "0",
        "--float",
    )
    for ss in field.trajectory_seeds(0, 5):
        traj, _ = field.sample_field_trajectory(ss, p)
        assert traj.conditions["peak"][0] == pytest.approx(235.0)  # 255 - 20
        clean = field.clean_frames(traj, 11)
        assert clean.max() <= 255 + 1e-9 and clean.max() > 20 + 0.5 * 235


# --- the files ----------------------------------------------------------------------------------


def test_files_are_the_scenes(tmp_path):
    out = tmp_path / "ds"
    flags = ("--bit-depth", "mixed", "--background", "mixed", "--geometry", "mixed", "--bad-pixels", "0-3")
    assert _run(out, *flags, n=8, seed=4) == 0
    p = _params(*flags)
    seeds = field.trajectory_seeds(4, 8)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scenario"] == "field" and meta["seed"] == 4 and meta["frames_per_trajectory"] == 20
    assert meta["params"]["bit_depth"] == [8, 12, 14, 16] and meta["image_format"] == "png-uint8/uint16"
    i = 0
    for name in simulate.SPLITS:
        n_split = meta["splits"][name]["trajectories"]
        if not n_split:
            continue
        split = data.read_split(out, name, progress=False)
        cond = field.read_conditions(out, name)
        assert len(cond) == split.n_trajectories == n_split
        for tr in range(n_split):
            traj, rng = field.sample_field_trajectory(seeds[i], p)
            expect = field.render(traj, rng, p.size)
            np.testing.assert_array_equal(split.frames[tr], expect)  # 8 and 16 bits read back exactly
            png = cv2.imread(str(data.image_path(out / name, 20 * tr)), cv2.IMREAD_UNCHANGED)
            assert png.dtype == (np.uint8 if traj.bit_depth == 8 else np.uint16)
            np.testing.assert_array_equal(png, expect[0])
            np.testing.assert_array_equal(np.stack(split.targets[tr]), traj.targets)  # brightness in sensor units
            ann = (out / name / "annotation" / f"COS{20 * tr}.xml").read_text()
            assert f"<sigma>{traj.psf_sigma!r}</sigma>" in ann
            c = cond[tr]
            assert c["trajectory"] == i and c["split_index"] == tr and c["bit_depth"] == traj.bit_depth
            assert c["saturation"] == 2**traj.bit_depth - 1 and expect.max() <= c["saturation"]
            assert c["background"] == json.loads(json.dumps(traj.conditions["background"]))
            i += 1
    assert i == 8


def test_high_bit_depths_round_trip(tmp_path):
    out = tmp_path / "deep"
    assert (
        _run(
            out,
            "--bit-depth",
            "12,14,16",
            "--pedestal",
            "1000,3000",
            "--snr",
            "200,sat",
            "--noise",
            "5",
            "--split",
            "1,0,0",
            n=6,
        )
        == 0
    )
    split = data.read_split(out, "train", progress=False)
    cond = field.read_conditions(out, "train")
    assert {c["bit_depth"] for c in cond} <= {12, 14, 16}
    assert split.frames.max() > 4000
    for tr, c in enumerate(cond):
        assert split.frames[tr].max() <= 2 ** c["bit_depth"] - 1
    img = data.read_png(data.image_path(out / "train", 0))
    assert img.dtype == np.uint16 and img.shape == (11, 11)


def test_twelve_bits_saturate_at_4095(tmp_path):
    out = tmp_path / "sat"
    assert _run(out, "--bit-depth", "12", "--snr", "3000", "--noise", "1", "--split", "1,0,0", n=2) == 0
    split = data.read_split(out, "train", progress=False)
    assert split.frames.max() == 4095
    assert all(c["saturated_pixels"] > 0 for c in field.read_conditions(out, "train"))


def test_clutter_statistics_on_disk(tmp_path):
    """A written clutter patch minus its annotated targets has the requested local std."""
    out = tmp_path / "cl"
    assert (
        _run(
            out,
            "--background",
            "clutter",
            "--clutter-std",
            "25",
            "--pedestal",
            "120",
            "--noise",
            "0",
            "--snr",
            "5,10",
            "--bad-pixels",
            "0",
            "--split",
            "1,0,0",
            n=6,
        )
        == 0
    )
    split = data.read_split(out, "train", progress=False)
    for tr, c in enumerate(field.read_conditions(out, "train")):
        targets = np.stack([physics.pixel_response(t, 11, c["psf_sigma"]) for t in split.targets[tr]])
        bg = split.frames[tr] - targets  # the background, rounded
        assert np.all(np.abs(bg - bg[0]) <= 1.0)  # static
        assert bg[0].std() == pytest.approx(25.0, abs=0.3)


def test_float_mode(tmp_path):
    out = tmp_path / "fl"
    assert _run(out, "--float", "--split", "1,0,0", n=2) == 0
    assert json.loads((out / "meta.json").read_text())["image_format"] == "npy-float32"
    split = data.read_split(out, "train", progress=False)
    p = _params("--float")
    for tr, ss in enumerate(field.trajectory_seeds(0, 2)):
        traj, rng = field.sample_field_trajectory(ss, p)
        np.testing.assert_array_equal(split.frames[tr], field.render(traj, rng, 11, float_out=True))


def test_preview(tmp_path):
    assert _run(tmp_path / "pv", "--preview", str(tmp_path / "grid.png"), n=4) == 0
    img = cv2.imread(str(tmp_path / "grid.png"))
    assert img is not None and img.shape[0] > 400


# --- the flags ----------------------------------------------------------------------------------


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        simulate.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--scenario",
        "--background",
        "--pedestal",
        "--ramp",
        "--ramp-rise",
        "--clutter-std",
        "--clutter-scale",
        "--edge-contrast",
        "--edge-blur",
        "--bad-pixels",
        "--hot-level",
        "--snr",
        "--brightness",
        "--psf-sigma",
        "--noise",
        "--bit-depth",
        "--geometry",
        "--group-radius",
        "--min-separation",
        "--velocity",
        "--target-drift",
        "--targets",
        "--margin",
    ):
        assert flag in text


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--clutter-std", "-3"),
        ("--pedestal", "50,10"),
        ("--bit-depth", "10"),
        ("--background", "sky"),
        ("--geometry", "circle"),
        ("--snr", "0,5"),
        ("--snr", "sat,9"),
        ("--ramp", "10"),
        ("--bad-pixels", "x"),
        ("--hot-level", "0.5,2"),
        ("--group-radius", "0"),
        ("--min-separation", "-1"),
        ("--velocity", "abc"),
        ("--psf-sigma", "0.7,0.4"),
        ("--edge-blur", "nan"),
        ("--psf-shape", "sphere"),
        ("--moffat-beta", "1"),
        ("--moffat-beta", "4,3"),
    ],
)
def test_bad_values_name_the_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path / "bad", f"{flag}={value}")
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "extra, named",
    [
        (("--targets", "0-9"), "--targets"),
        (("--group-radius", "4"), "--group-radius"),
        (("--margin", "4"), "--margin"),
        (("--noise", "-1"), "--noise"),
        (("--psf-sigma", "0"), "--psf-sigma"),
        (("--bad-pixels", "200"), "--bad-pixels"),
    ],
)
def test_impossible_combinations_name_the_flag(tmp_path, capsys, extra, named):
    assert _run(tmp_path / "bad", *extra) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
