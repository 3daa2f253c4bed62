"""Tests of service.science.refine: the multi-frame physics fit behind ``refine="fit"``.

Small synthetic windows with known answers: targets (x, y, a) in the middle frame moving with
a common velocity, imaged by service.science.physics (float, or 8-bit via physics.quantize).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from service.science import physics, refine
from service.science.background import Edge, edge_column, fit_planes
from service.science.refine import (
    FitConfig,
    FitResult,
    _best_subset,
    _cluster,
    _flux_counts,
    _frame_levels,
    _frame_times,
    _FrameProblem,
    _Problem,
    _Window,
    estimate_noise,
    fit_window,
    position_bound,
    refine_windows,
)

# a SeqCSIST-like group: 4 targets 0.3 px from a reference point, up/down/left/right
DIAMOND = np.array([[5.32, 4.91, 241.0], [4.70, 4.93, 228.0], [5.02, 5.24, 236.0], [4.99, 4.62, 247.0]])
VELOCITY = np.array([0.04, -0.03])
TIMES = np.arange(-2.0, 3.0)
# float frames, no noise: the scale is then tiny and the priors negligible next to the data
EXACT = FitConfig(noise=0.0, quantized=False)


def window(
    targets: np.ndarray, velocity=VELOCITY, times=TIMES, quantize: bool = False, noise: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Frames (len(times), 11, 11) of ``targets`` (middle frame) moving with ``velocity``."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in times:
        img = physics.pixel_response(targets + [velocity[0] * t, velocity[1] * t, 0.0])
        if noise:
            img = img + rng.normal(0.0, noise, img.shape)
        frames.append(physics.quantize(img) if quantize else img)
    return np.stack(frames).astype(np.float64)


def match_error(found: np.ndarray, truth: np.ndarray) -> float:
    """Largest distance from a true target to its nearest found one (counts must agree)."""
    assert len(found) == len(truth)
    d = np.hypot(found[:, None, 0] - truth[None, :, 0], found[:, None, 1] - truth[None, :, 1])
    return float(d.min(axis=0).max())


def perturbed(truth: np.ndarray, seed: int = 1, px: float = 0.12, grey: float = 12.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    start = truth.copy()
    start[:, :2] += rng.uniform(-px, px, size=(len(truth), 2))
    start[:, 2] += rng.uniform(-grey, grey, size=len(truth))
    return start


# ------------------------------------------------------------------------------ exact recovery


@pytest.mark.parametrize("solver", ["lm", "lm-numpy", "scipy"])
def test_exact_recovery_on_noise_free_float_frames(solver):
    frames = window(DIAMOND)
    start = perturbed(DIAMOND)
    budget = {"max_nfev": 100} if solver == "scipy" else {}  # trf needs more steps
    r = fit_window(frames, start, FitConfig(noise=0.0, quantized=False, solver=solver, **budget))
    assert r.accepted and r.k_start == 4 and r.k_final == 4
    assert match_error(r.targets, DIAMOND) < 1e-4
    order = np.argsort(-DIAMOND[:, 2])
    np.testing.assert_allclose(r.targets[:, 2], DIAMOND[order, 2], atol=1e-2)
    np.testing.assert_allclose(r.targets[:, :2], DIAMOND[order, :2], atol=1e-4)  # sorted by brightness
    np.testing.assert_allclose(r.velocity, VELOCITY, atol=1e-5)
    assert r.cost < 1e-3


@pytest.mark.parametrize("times", [[0, 0, 0, 1, 2], None])  # given, or detected
def test_edge_padded_window_is_exact(times):
    # the first frame of a track: frames 0, 0, 0, 1, 2 of the track, middle = frame 0
    frames = window(DIAMOND, times=np.array([0.0, 0.0, 0.0, 1.0, 2.0]))
    r = fit_window(frames, perturbed(DIAMOND, seed=2), EXACT, times=times)
    assert r.accepted
    assert match_error(r.targets, DIAMOND) < 1e-4
    np.testing.assert_allclose(r.velocity, VELOCITY, atol=1e-5)


def test_padding_detection():
    frames = window(DIAMOND, times=np.arange(4.0))  # f0, f1, f2, f3
    end = np.stack([frames[1], frames[2], frames[3], frames[3], frames[3]])  # last frame
    second = np.stack([frames[0], frames[0], frames[1], frames[2], frames[3]])  # second frame
    np.testing.assert_array_equal(_frame_times(end), [-2, -1, 0, 0, 0])
    np.testing.assert_array_equal(_frame_times(second), [-1, -1, 0, 1, 2])
    np.testing.assert_array_equal(_frame_times(window(DIAMOND)), [-2, -1, 0, 1, 2])
    # fitted as an ordinary window, a clean padded one misfits the rigid model, and each frame's
    # shift off the track takes up the copies (the frame terms): nearly the padding-aware answer
    start, truth = DIAMOND + [0.1, 0.0, 0.0], DIAMOND + [3 * VELOCITY[0], 3 * VELOCITY[1], 0.0]
    rigid = fit_window(end, start, FitConfig(detect_padding=False, max_reduced_chi2=1e9))
    assert rigid.cost / (end.size - 18) > FitConfig().max_reduced_chi2
    padded = fit_window(end, start, FitConfig(detect_padding=False))
    assert padded.accepted and padded.k_final == 4
    assert match_error(padded.targets, truth) < 0.02
    assert match_error(fit_window(end, start).targets, truth) < 0.01


def test_clean_8bit_window_beats_the_cell_centres():
    frames = window(DIAMOND, quantize=True)
    cells = DIAMOND.copy()
    cells[:, :2] = physics.hr_to_lr(physics.lr_to_hr_index(DIAMOND[:, :2]))
    r = fit_window(frames, cells)
    assert r.accepted and r.k_final == 4
    assert match_error(cells, DIAMOND) > 0.05  # the grid's error
    assert match_error(r.targets, DIAMOND) < 0.04  # rounding to 8 bits limits it
    assert r.targets[0, 2] == r.targets[:, 2].max()  # sorted, brightness is the score


# ------------------------------------------------------------------------------ Jacobian


def test_analytic_jacobian_matches_finite_differences():
    truth = DIAMOND[:3]
    frames = window(truth, quantize=True, noise=2.0)
    frames[2, 5, 5] = 255.0  # one saturated pixel, model below it: counts; others above: not
    cfg = FitConfig(noise=2.0)
    win = _Window(frames, TIMES, truth, cfg)
    prob = _Problem(win, truth[:, :2], np.array([True, False, True]), win.scale, free_sigma=True)
    theta = prob.pack(perturbed(truth, seed=4, px=0.05), [0.03, 0.01], [1.5, 0.2, -0.1], 0.55)
    jac = prob.jacobian(theta)
    eps = 1e-6
    numeric = np.stack(
        [(prob.residuals(theta + eps * e) - prob.residuals(theta - eps * e)) / (2 * eps) for e in np.eye(theta.size)],
        axis=1,
    )
    assert jac.shape == (prob.n_res, 3 * 3 + 2 + 1 + 3)  # targets, velocity, PSF sigma, background plane
    # rows: data pixels, 2 x 2 position priors (targets 0 and 2), 3 brightness priors, the PSF prior
    assert prob.n_res == win.n + 4 + 3 + 1
    np.testing.assert_allclose(jac, numeric, atol=1e-6 * np.abs(jac).max())


def test_frame_problem_jacobian_matches_finite_differences():
    truth = DIAMOND[:3]
    frames = window(truth, quantize=True, noise=2.0)
    frames[2, 5, 5] = 255.0
    win = _Window(frames, TIMES, truth, FitConfig(noise=2.0))
    prob = _FrameProblem(win, truth[:, :2], np.array([True, False, True]), win.scale, free_sigma=True)
    theta = prob.pack(perturbed(truth, seed=4, px=0.05), [0.03, 0.01], [1.5, 0.2, -0.1], 0.55)
    rng = np.random.default_rng(6)
    theta[prob.i_off : prob.i_gain] = rng.uniform(-0.2, 0.2, prob.i_gain - prob.i_off)  # frame shifts
    theta[prob.i_gain :] = rng.uniform(0.7, 1.3, prob.n_params - prob.i_gain)  # per-frame gains
    jac = prob.jacobian(theta)
    eps = 1e-6
    numeric = np.stack(
        [(prob.residuals(theta + eps * e) - prob.residuals(theta - eps * e)) / (2 * eps) for e in np.eye(theta.size)],
        axis=1,
    )
    # the rigid problem's parameters, then 4 frames' shifts (x, y) and 4 x 3 gains
    assert jac.shape == (prob.n_res, 3 * 3 + 2 + 1 + 3 + 2 * 4 + 4 * 3)
    assert prob.n_res == win.n + 4 + 3 + 1 + 2 * 4 + 4 * 3  # their priors too
    np.testing.assert_allclose(jac, numeric, atol=1e-6 * np.abs(jac).max())
    # shifts 0 and gains 1: the rigid model
    rigid = _Problem(win, truth[:, :2], np.array([True, False, True]), win.scale, free_sigma=True)
    plain = prob.pack(truth, [0.03, 0.01], [1.5, 0.2, -0.1], 0.5)
    np.testing.assert_allclose(prob.model(plain), rigid.model(plain[: rigid.n_params]))


# DIAMOND twice as wide (targets 0.6 px from its centre): in a group as packed as DIAMOND, per-frame
# shifts and gains trade against the positions, and the fit places targets to 0.1-0.2 px
WIDE = np.column_stack([5.0 + 2.0 * (DIAMOND[:, :2] - 5.0), DIAMOND[:, 2]])


def jittered_window(shift_sd: float, gain_sd: float, seed: int) -> np.ndarray:
    """WIDE's window with the group shifted off its track in every frame and each target's
    brightness scaled in every frame but the middle one (platform jitter, scintillation), 8-bit,
    noise 1."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in TIMES:
        moved = WIDE + [VELOCITY[0] * t, VELOCITY[1] * t, 0.0]
        if t != 0:
            moved[:, :2] += rng.normal(0.0, shift_sd, 2)
            moved[:, 2] *= np.clip(1.0 + rng.normal(0.0, gain_sd, len(DIAMOND)), 0.3, None)
        frames.append(physics.quantize(physics.pixel_response(moved) + rng.normal(0.0, 1.0, (11, 11))))
    return np.stack(frames).astype(np.float64)


@pytest.mark.parametrize("shift_sd, gain_sd", [(0.12, 0.0), (0.0, 0.25)])
def test_frames_that_depart_from_the_window_model_are_fitted_with_frame_terms(shift_sd, gain_sd):
    frames = jittered_window(shift_sd, gain_sd, seed=16)
    start = perturbed(WIDE, seed=17)
    rigid = fit_window(frames, start, FitConfig(max_reduced_chi2=1e9))
    assert rigid.cost / (frames.size - 18) > FitConfig().max_reduced_chi2  # the rigid model misfits
    r = fit_window(frames, start)
    assert r.accepted and r.k_final == 4
    # the middle frame's targets, to a few hundredths of a pixel (the rigid model's fallback
    # answer, the start, is off by up to 0.12)
    assert match_error(r.targets, WIDE) < 0.08 < match_error(start, WIDE)
    assert np.sort(r.targets[:, 2]) == pytest.approx(np.sort(WIDE[:, 2]), rel=0.15)


@pytest.mark.skipif(not refine.NATIVE_FRAMES, reason="service.kernels._fit is not built with the frame terms")
@pytest.mark.parametrize("shift_sd, gain_sd", [(0.12, 0.0), (0.0, 0.25), (0.1, 0.2)])
def test_the_c_solver_fits_the_frame_terms_as_numpy_does(shift_sd, gain_sd, monkeypatch):
    frames = jittered_window(shift_sd, gain_sd, seed=21)
    start = perturbed(WIDE, seed=22)
    native = fit_window(frames, start)
    monkeypatch.setattr(refine, "NATIVE_FRAMES", False)
    reference = fit_window(frames, start)
    assert native.accepted == reference.accepted and native.k_final == reference.k_final
    assert native.nfev == reference.nfev
    np.testing.assert_allclose(native.targets, reference.targets, atol=1e-6)
    assert native.cost == pytest.approx(reference.cost, rel=1e-9)
    # and the frame terms' Jacobian the C solver steps with is the numpy one's
    win = _Window(frames, TIMES, start, FitConfig())
    prob = _FrameProblem(win, start[:, :2], np.ones(4, dtype=bool), win.scale)
    theta = prob.pack(start, VELOCITY, win.bg0)
    theta[prob.i_off :] += np.random.default_rng(23).normal(0.0, 0.05, theta.size - prob.i_off)
    native_theta, native_nfev, _ = refine._solve_native(prob, theta.copy(), 30, 1e-4)
    numpy_theta, numpy_nfev, _ = refine._solve_lm(prob, theta.copy(), 30, 1e-4)
    assert native_nfev == numpy_nfev > 2
    np.testing.assert_allclose(native_theta, numpy_theta, atol=1e-7)


def test_frames_at_different_levels_are_taken_to_one():
    # a sensor's gain control moves each frame's level: 4 grey levels here, noise 1.5
    rng = np.random.default_rng(18)
    levels = np.array([3.0, -4.0, 0.0, 5.0, -2.0])
    clean = window(DIAMOND) + 60.0
    frames = np.rint(clean + levels[:, None, None] + rng.normal(0.0, 1.5, clean.shape))
    found = _frame_levels(frames)
    assert found is not None
    np.testing.assert_allclose(found - found[2], levels, atol=0.5)
    steady = np.rint(clean + rng.normal(0.0, 1.5, clean.shape))
    assert _frame_levels(steady) is None  # one level: the window is left as it is
    assert _frame_levels(window(DIAMOND, quantize=True)) is None  # a dark floor: no level to see
    start = perturbed(DIAMOND, seed=19)
    r = fit_window(frames, start)
    assert r.accepted and r.k_final == 4
    assert r.noise == pytest.approx(math.sqrt(1.5**2 + 1 / 12), rel=0.2)  # not the levels' spread
    assert match_error(r.targets, DIAMOND) < 0.12  # the steady window's fit: 0.09


def test_a_target_far_brighter_than_the_calibration_is_one_target():
    # flux 1400 against a calibration of 200-270: counted as six calibrated targets at one place,
    # which fit its clipped frames as well as one target does
    truth = np.array([[5.1, 4.8, 1400.0]])
    rng = np.random.default_rng(20)
    frames = np.stack(
        [
            physics.quantize(
                physics.pixel_response(truth + [VELOCITY[0] * t, VELOCITY[1] * t, 0.0])
                + 40.0
                + rng.normal(0, 1.5, (11, 11))
            )
            for t in TIMES
        ]
    ).astype(np.float64)
    assert (frames[2] >= 255).any()
    r = fit_window(frames, truth + [0.1, -0.1, -1000.0])
    assert r.accepted and r.k_final == 1
    assert match_error(r.targets, truth) < 0.05
    assert r.targets[0, 2] == pytest.approx(1400.0, rel=0.05)


def test_saturated_pixels_are_lower_bounds():
    # two bright targets: the centre pixel clips at 255 in every frame
    truth = np.array([[5.0, 5.2, 500.0], [5.5, 4.9, 460.0]])
    frames = window(truth, quantize=True)
    assert (frames >= 255).sum() >= 5
    start = truth.copy()
    start[:, :2] += [[0.1, -0.08], [-0.07, 0.1]]
    start[:, 2] = 450.0
    base = dict(brightness_range=(300.0, 700.0), brightness_prior=None, try_counts=False)
    good = fit_window(frames, start, FitConfig(**base))
    assert good.accepted
    assert match_error(good.targets, truth) < 0.02
    np.testing.assert_allclose(np.sort(good.targets[:, 2]), np.sort(truth[:, 2]), rtol=0.03)
    # the same fit treating 255 as a measurement fails: rejected, or far off when forced
    naive = fit_window(frames, start, FitConfig(**base, saturation=None))
    assert not naive.accepted
    forced = fit_window(frames, start, FitConfig(**base, saturation=None, fallback=False))
    assert match_error(forced.targets, truth) > 0.1


# ------------------------------------------------------------------------------ count


def test_order_selection_adds_the_missing_target():
    frames = window(DIAMOND, quantize=True)
    start = perturbed(np.delete(DIAMOND, 1, axis=0), seed=5, px=0.1)  # the network missed one
    r = fit_window(frames, start)
    assert r.accepted and r.k_start == 3 and r.k_final == 4
    assert match_error(r.targets, DIAMOND) < 0.03
    assert 3 not in r.criteria  # the flux rules out 3 targets of 200-270 grey levels
    assert all(r.criteria[4] < v for k, v in r.criteria.items() if k != 4)


def test_order_selection_drops_spare_peaks():
    """The network's usual error: one target spread over 2-3 adjacent HR cells."""
    frames = window(DIAMOND, quantize=True)
    cells = DIAMOND.copy()
    cells[:, :2] = physics.hr_to_lr(physics.lr_to_hr_index(DIAMOND[:, :2]))
    step = 1.0 / physics.RATIO
    spare = [[cells[0, 0] + step, cells[0, 1], 150.0], [cells[2, 0], cells[2, 1] + step, 120.0]]
    r = fit_window(frames, np.vstack([cells, spare]))
    assert r.accepted and r.k_start == 6 and r.k_final == 4
    # 4 targets within 0.6 px in 8-bit frames: configurations 0.03 px apart fit about as well
    assert match_error(r.targets, DIAMOND) < 0.04


def test_order_selection_drops_a_spurious_target():
    truth = DIAMOND[[0, 1, 3]]
    frames = window(truth, quantize=True)
    spurious = [[5.5, 5.6, 180.0]]  # 2/3 px from a target, where nothing is
    start = np.vstack([perturbed(truth, seed=6, px=0.1), spurious])
    r = fit_window(frames, start)
    assert r.accepted and r.k_start == 4 and r.k_final == 3
    assert match_error(r.targets, truth) < 0.02


def test_order_selection_can_be_turned_off():
    frames = window(DIAMOND, quantize=True)
    assert fit_window(frames, perturbed(DIAMOND, seed=7, px=0.1)).k_final == 4
    fixed = fit_window(frames, np.delete(DIAMOND, 1, axis=0), FitConfig(try_counts=False, fallback=False))
    assert fixed.k_final == 3 and set(fixed.criteria) == {3}


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_flux_counts(k):
    """K targets of 200-270 grey levels, apart (no saturation), inside the patch: exactly K."""
    rng = np.random.default_rng(k)
    truth = np.column_stack([3.0 + 1.3 * np.arange(k), np.full(k, 5.0), rng.uniform(220, 250, k)])
    for noise in (0.0, 5.0):
        frames = window(truth, quantize=True, noise=noise, seed=k)
        win = _Window(frames, TIMES, truth, FitConfig())
        assert _flux_counts(win) == ([k], False)


def test_flux_counts_is_open_ended_where_the_flux_is_a_lower_bound():
    close = np.array([[5.0, 5.0, 250.0], [5.1, 5.05, 250.0], [4.95, 5.1, 250.0]])  # saturates
    frames = window(close, quantize=True)
    assert frames.max() == 255.0
    counts, open_ended = _flux_counts(_Window(frames, TIMES, close, FitConfig()))
    assert open_ended and counts[0] <= 3
    edge = np.array([[0.2, 5.0, 240.0], [5.0, 5.0, 240.0]])  # half of one target is outside
    frames = window(edge, quantize=True)
    counts, open_ended = _flux_counts(_Window(frames, TIMES, edge, FitConfig()))
    assert open_ended and counts[0] <= 2
    r = fit_window(frames, edge + [0.05, -0.05, 0.0])
    assert r.accepted and r.k_final == 2 and match_error(r.targets, edge) < 0.03


def test_flux_counts_with_a_miscalibrated_brightness_range():
    """Targets of 120 against a configured 200-270: no count fits, the nearest one is used."""
    truth = np.array([[4.0, 5.0, 120.0], [6.0, 5.0, 120.0]])
    frames = window(truth, quantize=True)
    win = _Window(frames, TIMES, truth, FitConfig())
    assert _flux_counts(win) == ([1], False)


@pytest.mark.parametrize("native", [True, False])
def test_cluster_centres(native):
    xy = np.array([[1.0, 1.0], [1.2, 1.0], [5.0, 5.0], [5.0, 5.4], [5.0, 5.2]])
    w = np.array([1.0, 3.0, 2.0, 1.0, 1.0])
    c = _cluster(xy, w, 2, native=native)
    c = c[np.argsort(c[:, 0])]
    np.testing.assert_allclose(c, [[1.15, 1.0], [5.0, 5.15]])


@pytest.mark.skipif(not refine.NATIVE, reason="service.kernels._fit is not built")
def test_the_c_clustering_gives_the_numpy_answer():
    rng = np.random.default_rng(9)
    for _ in range(300):
        n = int(rng.integers(2, 16))
        k = int(rng.integers(1, n))
        xy = rng.uniform(2, 8, (n, 2)).round(2)  # the network's peaks sit on a grid: ties happen
        w = rng.choice([0.0, 50.0, 120.0, 240.0], n) if rng.random() < 0.3 else rng.uniform(0, 300, n)
        np.testing.assert_allclose(_cluster(xy, w, k), _cluster(xy, w, k, native=False), rtol=1e-12, atol=1e-12)
    from service.kernels import _fit

    with pytest.raises(ValueError, match="k < n"):
        _fit.kmeans(np.zeros((2, 2)), np.zeros((2, 2)), np.ones(2), 2, 8)
    with pytest.raises(ValueError, match="xy"):
        _fit.kmeans(np.zeros((2, 2)), np.zeros((3, 3)), np.ones(3), 2, 8)


def test_best_subset_leaves_the_spurious_peak_out():
    frames = window(DIAMOND, quantize=True)
    peaks = np.vstack([DIAMOND[[0, 2, 3]], [[5.7, 5.6, 200.0]], DIAMOND[[1]]])
    win = _Window(frames, TIMES, peaks, FitConfig())
    start = _best_subset(win, peaks, 4, VELOCITY)
    assert match_error(start, DIAMOND) < 1e-9
    assert _best_subset(win, peaks, 2, VELOCITY, max_subsets=3) is None  # C(5, 2) = 10 subsets


# ------------------------------------------------------------------------------ fallback


def test_fallback_on_garbage_frames_returns_the_peaks_unchanged():
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 256, size=(5, 11, 11)).astype(np.float64)
    peaks = np.array([[5.0, 5.0, 230.0], [5.3, 4.7, 240.0]])  # deliberately not sorted
    r = fit_window(frames, peaks)
    assert not r.accepted and r.reason
    np.testing.assert_array_equal(r.targets, peaks)
    assert r.k_final == r.k_start == 2


def test_a_group_away_from_the_peaks_is_fitted_where_its_light_is(monkeypatch):
    frames = window(DIAMOND - [3.0, 3.0, 0.0], quantize=True)  # the group is near (2, 2)
    peaks = DIAMOND.copy()  # the peaks say (5, 5): 3 px away, the fit may move 0.5 px
    r = fit_window(frames, peaks)
    # the fit from the peaks misfits, and leaves the group's light: fitted again from there,
    # without the peaks that have no light under them
    assert r.accepted and r.k_start == 4 and r.k_final == 4
    assert match_error(r.targets, DIAMOND - [3.0, 3.0, 0.0]) < 0.05
    # without that, the targets are out of reach and the peaks come back
    monkeypatch.setattr(refine, "_missed", lambda *args, **kwargs: None)
    r = fit_window(frames, peaks)
    assert not r.accepted
    np.testing.assert_array_equal(r.targets, peaks)


def test_zero_peaks_and_bad_input():
    # no peaks and nothing in the frames: nothing to fit
    empty = window(DIAMOND[:0], quantize=True, noise=2.0, seed=3)
    r = fit_window(empty, np.zeros((0, 3)))
    assert isinstance(r, FitResult) and r.targets.shape == (0, 3) and not r.accepted and r.k_final == 0
    # no peaks, but a group the network missed: the fit starts from the frames' brightest spot
    frames = window(DIAMOND, quantize=True)
    r = fit_window(frames, np.zeros((0, 3)))
    assert r.accepted and r.k_start == 1 and r.k_final == 4
    assert match_error(r.targets, DIAMOND) < 0.05
    assert fit_window(empty, []).targets.shape == (0, 3)
    with pytest.raises(ValueError):
        fit_window(frames, np.zeros((2, 2)))
    with pytest.raises(ValueError):
        fit_window(frames[0], DIAMOND)
    with pytest.raises(ValueError):
        fit_window(frames, DIAMOND, times=[0, 1])
    nan = frames.copy()
    nan[0, 0, 0] = np.nan
    assert not fit_window(nan, DIAMOND).accepted
    with pytest.raises(ValueError):
        FitConfig(criterion="hqc")
    with pytest.raises(ValueError):
        FitConfig(brightness_range=(300.0, 200.0))


# ------------------------------------------------------------------------------ the rest


def test_scipy_and_builtin_solvers_agree_on_a_noisy_window():
    frames = window(DIAMOND, quantize=True, noise=3.0, seed=9)
    start = perturbed(DIAMOND, seed=10, px=0.1)
    a = fit_window(frames, start, FitConfig(solver="lm", max_nfev=100, tol=1e-8))
    b = fit_window(frames, start, FitConfig(solver="scipy", max_nfev=100, tol=1e-8))
    assert a.k_final == b.k_final == 4
    np.testing.assert_allclose(a.targets[:, :2], b.targets[:, :2], atol=2e-3)
    assert a.cost == pytest.approx(b.cost, rel=1e-3)


def test_noise_estimate():
    rng = np.random.default_rng(11)
    assert estimate_noise(np.zeros(200)) == 0.0
    clipped = physics.quantize(rng.normal(0.0, 3.0, size=5000)).astype(float)  # dark, 8-bit
    assert estimate_noise(clipped) == pytest.approx(3.0, rel=0.08)
    offset = np.rint(rng.normal(50.0, 4.0, size=5000))
    assert estimate_noise(offset) == pytest.approx(4.0, rel=0.08)
    assert estimate_noise(rng.normal(0.0, 4.0, size=5000)) == pytest.approx(4.0, rel=0.08)  # float
    signal = clipped.copy()
    signal[:500] = 200.0  # 10 % of the pixels hold signal: quantiles move a little only
    assert 3.0 < estimate_noise(signal) < 4.5  # (a mean square would say about 90)
    assert estimate_noise(np.zeros(5)) is None


def test_a_group_faster_than_the_speed_bound_is_fitted_with_a_larger_bound():
    # 0.3 px/frame: twice the default bound (0.15, about SeqCSIST's speeds); a tracker's patch can
    # hold such motion, and fitted within the bound every count misfits and falls back
    fast = np.array([0.3, -0.22])
    frames = window(DIAMOND, velocity=fast, quantize=True, noise=1.0, seed=14)
    start = perturbed(DIAMOND, seed=15)
    assert FitConfig().max_speed_px < 0.3
    r = fit_window(frames, start)
    assert r.accepted and r.k_final == 4
    assert r.velocity == pytest.approx(tuple(fast), abs=0.02)
    assert match_error(r.targets, DIAMOND) < 0.06
    # a group within the bound keeps it (the answer of the default window)
    slow = fit_window(window(DIAMOND, quantize=True, noise=1.0, seed=14), start)
    assert slow.accepted and max(abs(v) for v in slow.velocity) <= FitConfig().max_speed_px


def test_calibrated_scales_the_8bit_defaults_by_the_clip_level():
    assert FitConfig.calibrated(0.5, 255.0) == FitConfig()
    assert FitConfig.calibrated(0.5, None) == FitConfig(saturation=None)  # no clip level: no scale
    twelve = FitConfig.calibrated(0.6, 4095.0)
    scale = 4095.0 / 255.0
    assert twelve.psf_sigma == 0.6 and twelve.saturation == 4095.0
    assert twelve.brightness_range == pytest.approx((200.0 * scale, 270.0 * scale))
    assert twelve.brightness_prior == pytest.approx(20.0 * scale)
    assert twelve.max_noise == pytest.approx(25.0 * scale)
    given = FitConfig.calibrated(0.5, 4095.0, (3000.0, 4200.0))  # a calibrated range is kept as given
    assert given.brightness_range == (3000.0, 4200.0) and given.brightness_prior == pytest.approx(1200.0 / 3.5)
    assert given.max_noise == pytest.approx(25.0 * scale)


def test_a_12bit_window_is_fitted_with_its_clip_level():
    # DIAMOND 16 times as bright on a pedestal of 800 at noise 32: an 8-bit window at noise 2 as a
    # 12-bit sensor delivers it
    truth = DIAMOND * [1.0, 1.0, 16.0]
    rng = np.random.default_rng(13)
    frames = []
    for t in TIMES:
        image = physics.pixel_response(truth + [VELOCITY[0] * t, VELOCITY[1] * t, 0.0]) + 800.0
        frames.append(np.clip(np.rint(image + rng.normal(0.0, 32.0, image.shape)), 0.0, 4095.0))
    frames, start = np.stack(frames), perturbed(truth, grey=150.0)
    # with 8-bit grey levels the noise is past max_noise and the targets past the brightness range
    assert not fit_window(frames, start, FitConfig(saturation=4095.0)).accepted
    r = fit_window(frames, start, FitConfig.calibrated(0.5, 4095.0))
    assert r.accepted and r.k_final == 4
    assert r.noise == pytest.approx(32.0, rel=0.15)
    assert match_error(r.targets, truth) < 0.1
    assert np.sort(r.targets[:, 2]) == pytest.approx(np.sort(truth[:, 2]), rel=0.1)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
def test_noise_estimate_of_rounded_frames_does_not_depend_on_the_planes_fraction(sigma):
    # rounded frames on a pedestal: read as whole grey levels, a noise of 2 came out anywhere
    # from 1.5 to 2.2 with the fractional part of the plane under the pixels
    rng = np.random.default_rng(12)
    yy, xx = np.mgrid[0:11, 0:11]
    for level in (20.0, 20.3, 20.5, 149.98):
        for slope in (0.0, 0.13):
            plane = np.tile((level + slope * xx - 0.07 * slope * yy).ravel(), 5)
            values = np.rint(plane + rng.normal(0.0, sigma, size=plane.size))
            assert estimate_noise(values, plane=plane) == pytest.approx(sigma, rel=0.1), (level, slope)
    # noise-free rounded frames have no noise beyond the rounding, which the fit adds itself
    flat = np.full(300, 150.0)
    assert estimate_noise(flat, plane=149.7) == 0.0
    assert estimate_noise(flat, plane=150.0) == 0.0
    # float frames are read as they are
    floats = 150.3 + rng.normal(0.0, sigma, size=2000)
    assert estimate_noise(floats, plane=150.3) == pytest.approx(sigma, rel=0.1)
    # a noisy window: the fit uses about the true sigma (plus 1/12 of rounding)
    r = fit_window(window(DIAMOND, quantize=True, noise=4.0, seed=12), DIAMOND)
    assert r.noise == pytest.approx(np.sqrt(16 + 1 / 12), rel=0.2)


def test_refine_windows_loops_over_windows():
    frames = window(DIAMOND, quantize=True)
    empty = window(DIAMOND[:0], quantize=True)
    out = refine_windows(np.stack([frames, empty]), [DIAMOND, np.zeros((0, 3))])
    assert len(out) == 2 and out[0].shape == (4, 3) and out[1].shape == (0, 3)
    with pytest.raises(ValueError):
        refine_windows(np.stack([frames]), [DIAMOND, DIAMOND])


def test_speed_per_window():
    rng = np.random.default_rng(13)
    windows, starts = [], []
    for i in range(20):
        shift = rng.uniform(-2.0, 2.0, size=2)
        truth = DIAMOND[: 2 + i % 3] + [shift[0], shift[1], 0.0]
        windows.append(window(truth, quantize=True, noise=2.0, seed=i))
        cells = truth.copy()
        cells[:, :2] = physics.hr_to_lr(physics.lr_to_hr_index(truth[:, :2]))
        starts.append(cells)
    fit_window(windows[0], starts[0])  # warm up
    t0 = time.perf_counter()
    for w, s in zip(windows, starts):
        fit_window(w, s)
    per_window = (time.perf_counter() - t0) / len(windows)
    assert per_window < 0.03  # measured about 2 ms on one core; generous for a shared machine


def ramp(height: float, gx: float, gy: float) -> np.ndarray:
    """A background plane (11, 11): ``height`` at the patch centre, gradients gx, gy per pixel."""
    rows, cols = np.mgrid[0:11, 0:11].astype(np.float64)
    return height + gx * (cols - 5) + gy * (rows - 5)


@pytest.mark.parametrize("background", [(40.0, 0.0, 0.0), (35.0, 2.5, -1.5)])
def test_background_plane_is_fitted_with_the_targets(background):
    truth = DIAMOND[:3]
    frames = window(truth) + ramp(*background)
    frames = np.stack([physics.quantize(f) for f in frames]).astype(np.float64)
    r = fit_window(frames, perturbed(truth, seed=5, px=0.08))
    assert r.accepted, r.reason
    assert match_error(r.targets, truth) < 0.03
    np.testing.assert_allclose(r.background, background, atol=0.3)
    # the same frames without a background term: the pedestal cannot be explained
    flat = fit_window(frames, perturbed(truth, seed=5, px=0.08), FitConfig(background=False))
    assert (
        not flat.accepted
        or len(flat.targets) != 3
        or match_error(flat.targets, truth) > 3 * match_error(r.targets, truth)
    )


def test_psf_sigma_is_fitted_where_the_calibration_leaves_a_misfit():
    truth = DIAMOND[:3]
    wide = []
    for t in TIMES:
        img = physics.pixel_response(truth + [VELOCITY[0] * t, VELOCITY[1] * t, 0.0], sigma=0.6)
        wide.append(physics.quantize(img))
    frames = np.stack(wide).astype(np.float64)
    start = perturbed(truth, seed=6, px=0.08)
    r = fit_window(frames, start)  # calibrated sigma 0.5, the optics 0.6
    assert r.accepted, r.reason
    assert r.psf_sigma == pytest.approx(0.6, abs=0.02)
    assert match_error(r.targets, truth) < 0.05
    fixed = fit_window(frames, start, FitConfig(fit_psf=False))
    assert (
        not fixed.accepted
        or len(fixed.targets) != 3
        or match_error(fixed.targets, truth) > 2 * match_error(r.targets, truth)
    )
    # where the calibration is right, sigma stays the calibration
    assert fit_window(window(truth, quantize=True), start).psf_sigma == 0.5


@pytest.mark.parametrize("sigma", [0.9, 1.2])
def test_a_psf_much_wider_than_the_calibration_is_fitted_not_split(sigma):
    """Defocused optics: a target with a PSF twice the calibrated 0.5 is one wide target, not a
    ring of narrow ones (with the sigma capped at +40 % it came out as 6-7 targets)."""
    rng = np.random.default_rng(int(sigma * 10))
    truth = np.array([[5.2, 4.9, 240.0], [6.6, 5.3, 225.0]])
    frames = np.stack(
        [
            physics.quantize(
                physics.pixel_response(truth + [VELOCITY[0] * t, VELOCITY[1] * t, 0.0], sigma=sigma)
                + rng.normal(0.0, 1.0, (11, 11))
            )
            for t in TIMES
        ]
    ).astype(np.float64)
    start = np.array([[5.0, 5.0, 150.0], [5.33, 4.67, 120.0], [6.67, 5.33, 110.0], [6.33, 5.67, 90.0]])
    r = fit_window(frames, start)  # calibrated sigma 0.5
    assert r.accepted, r.reason
    assert len(r.targets) == 2 and r.psf_sigma == pytest.approx(sigma, rel=0.1)
    assert match_error(r.targets, truth) < 0.1
    capped = fit_window(frames, start, FitConfig(psf_max=1.4))
    assert not capped.accepted or len(capped.targets) != 2 or match_error(capped.targets, truth) > 0.1


def haloed(targets: np.ndarray, share: float, width: float, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """8-bit frames of ``targets`` through a PSF whose halo, a Gaussian ``width`` x 0.5 px, holds
    ``share`` of each target's flux (the wings of real optics)."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in TIMES:
        moved = targets + [VELOCITY[0] * t, VELOCITY[1] * t, 0.0]
        img = (1 - share) * physics.pixel_response(moved) + share * physics.pixel_response(moved, sigma=0.5 * width)
        frames.append(physics.quantize(img + rng.normal(0.0, noise, img.shape)))
    return np.stack(frames).astype(np.float64)


def test_the_jacobian_with_a_halo_matches_finite_differences():
    truth = DIAMOND[:3]
    frames = haloed(truth, 0.3, 2.0)
    win = _Window(frames, TIMES, truth, FitConfig(noise=1.0, psf_halo=(0.3, 2.0)))
    prob = _Problem(win, truth[:, :2], np.array([True, True, True]), win.scale, free_sigma=True)
    theta = prob.pack(perturbed(truth, seed=5, px=0.05), [0.03, 0.01], [0.5, 0.1, -0.1], 0.52)
    eps = 1e-6
    numeric = np.stack(
        [(prob.residuals(theta + eps * e) - prob.residuals(theta - eps * e)) / (2 * eps) for e in np.eye(theta.size)],
        axis=1,
    )
    jac = prob.jacobian(theta)
    np.testing.assert_allclose(jac, numeric, atol=1e-6 * np.abs(jac).max())
    # the model is the shares' sum of the two Gaussians
    targets, v, bg, sigma = prob.unpack(theta)
    plain = _Window(frames, TIMES, truth, FitConfig(noise=1.0))
    expect = 0.7 * plain.model(targets, v, bg, sigma) + 0.3 * plain.model(targets, v, bg, 2 * sigma)
    np.testing.assert_allclose(prob.model(theta), expect, atol=1e-9)


@pytest.mark.parametrize("share, width", [(0.3, 2.0), (0.45, 3.0)])
def test_wings_of_the_optics_are_a_halo_not_more_targets(share, width):
    """A PSF with a halo (aberrations, scatter): without one the fit explains the wings as extra
    targets around each real one, or moves them."""
    truth = DIAMOND[:3]
    frames = haloed(truth, share, width, seed=int(10 * width))
    start = perturbed(truth, seed=7, px=0.08)
    r = fit_window(frames, start)
    assert r.accepted, r.reason
    assert len(r.targets) == 3 and match_error(r.targets, truth) < 0.06
    assert r.psf_halo > 0 and r.psf_sigma == pytest.approx(0.5, rel=0.1)
    plain = fit_window(frames, start, FitConfig(halos=()))
    assert plain.psf_halo == 0
    assert not plain.accepted or len(plain.targets) != 3 or match_error(plain.targets, truth) > 0.06
    # a Gaussian PSF gets none
    assert fit_window(window(truth, quantize=True, noise=1.0), start).psf_halo == 0


def test_a_config_given_lists_fits_as_with_tuples():
    # FitConfig is hashable (the halo search caches its variants by it) whatever sequence it got
    truth = DIAMOND[:3]
    frames = haloed(truth, 0.3, 2.0, seed=20)
    start = perturbed(truth, seed=7, px=0.08)
    listed = FitConfig(brightness_range=[200.0, 270.0], halos=[0.15, 0.3, 0.5], halo_scales=[2.0, 3.0])
    assert listed == FitConfig() and hash(listed) == hash(FitConfig())
    got, want = fit_window(frames, start, listed), fit_window(frames, start)
    assert got.psf_halo == want.psf_halo > 0
    np.testing.assert_array_equal(got.targets, want.targets)


def test_sigma_derivative_matches_finite_differences():
    pos = np.array([3.3, 5.0, 7.81])
    eps = 1e-6
    numeric = (physics.pixel_fractions(pos, sigma=0.55 + eps) - physics.pixel_fractions(pos, sigma=0.55 - eps)) / (
        2 * eps
    )
    np.testing.assert_allclose(physics.pixel_fractions_dsigma(pos, sigma=0.55), numeric, atol=1e-7)


def test_targets_dimmer_than_the_calibration_are_counted_with_brightness_free():
    truth = DIAMOND[:3] * [1.0, 1.0, 0.42]  # brightness 96-101, below the default range (200, 270)
    frames = window(truth, quantize=True, noise=1.0, seed=8)
    start = perturbed(truth, seed=7, px=0.08)
    r = fit_window(frames, start)
    assert r.accepted, r.reason
    assert r.k_final == 3
    assert match_error(r.targets, truth) < 0.15
    # targets 0.3 px apart trade flux under noise; their sum is well measured
    assert r.targets[:, 2].sum() == pytest.approx(truth[:, 2].sum(), rel=0.05)
    # held to the calibration, the fit cannot give these targets their brightness
    held = fit_window(frames, start, FitConfig(free_brightness=False))
    assert not held.accepted or held.targets[:, 2].min() >= 200.0


def test_two_dim_targets_whose_flux_looks_like_one_calibrated_target_are_both_found():
    # 115 + 100 grey levels: the flux allows one target of the calibrated range (200, 270) and no
    # target is pinned at a bound, but one target cannot fit two spots 1 px apart
    truth = np.array([[5.0, 5.0, 115.0], [5.9, 5.6, 100.0]])
    frames = window(truth, quantize=True, noise=1.0, seed=3)
    start = np.array([[5.45, 5.3, 215.0]])  # one peak between them, as a blurred map gives
    r = fit_window(frames, start)
    assert r.accepted, r.reason
    assert r.k_final == 2
    assert match_error(r.targets, truth) < 0.1
    np.testing.assert_allclose(np.sort(r.targets[:, 2]), [100.0, 115.0], rtol=0.1)
    # held to the calibration, one target leaves a misfit and the fit falls back to the peak
    held = fit_window(frames, start, FitConfig(free_brightness=False))
    assert not held.accepted or held.k_final == 1


def test_a_hot_pixel_is_left_out_and_a_narrow_dim_pair_is_found_without_peaks():
    # a field patch the network saw nothing in: two dim targets 0.6 px apart under a PSF of 0.35
    # (brightness and PSF both off the calibration) on a pedestal, and a hot pixel brighter
    # than either of them in the corner
    truth = np.array([[5.04, 2.22, 87.0], [5.08, 1.61, 81.0]])
    rng = np.random.default_rng(5)
    frames = []
    for t in TIMES:
        img = physics.pixel_response(truth + [0.0, -0.05 * t, 0.0], sigma=0.35) + 127.0
        img = physics.quantize(img + rng.normal(0.0, 1.5, img.shape))
        img[10, 0] = 234.0
        frames.append(img)
    frames = np.stack(frames).astype(float)
    r = fit_window(frames, np.zeros((0, 3)))
    assert r.accepted, r.reason
    assert r.k_final == 2
    assert match_error(r.targets, truth) < 0.1
    assert r.psf_sigma == pytest.approx(0.35, abs=0.07)
    # with the hot pixel taken for data, the fit starts there instead
    planes = fit_planes(frames)[0]
    blind = fit_window(frames, np.zeros((0, 3)), planes=planes, stuck=np.zeros((11, 11), dtype=bool))
    assert not blind.accepted or np.hypot(*(blind.targets[0, :2] - [0.0, 10.0])) < 1.0


def test_uncertainties_are_calibrated_and_the_count_confident():
    """Normalised errors (fit - truth) / sigma spread about 1 when the truth is drawn as the
    priors say (brightness from the calibrated prior, starts within the position prior)."""
    rng = np.random.default_rng(11)
    z_pos, z_bright = [], []
    for _ in range(120):
        k = int(rng.integers(2, 5))
        angle, dist, centre = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.6), rng.uniform(4.0, 6.0, 2)
        dirs = np.array([[np.cos(angle + j * np.pi / 2), np.sin(angle + j * np.pi / 2)] for j in range(k)])
        truth = np.column_stack([centre + dist * dirs, np.clip(rng.normal(235, 20, k), 201, 269)])
        frames = window(
            truth, velocity=rng.uniform(-0.05, 0.05, 2), quantize=True, noise=3.0, seed=int(rng.integers(1e9))
        )
        start = truth.copy()
        start[:, :2] += rng.normal(0, 0.1, (k, 2))
        r = fit_window(frames, start)
        assert r.accepted and r.uncertainty.shape == (len(r.targets), 4)
        assert 0.0 < r.count_confidence <= 1.0
        if r.k_final != k:
            continue
        match = np.hypot(*(r.targets[:, None, :2] - truth[None, :, :2]).transpose(2, 0, 1)).argmin(axis=1)
        if len(set(match)) < k:
            continue
        z_pos += list((r.targets[:, :2] - truth[match, :2]).ravel() / r.uncertainty[:, :2].ravel())
        z_bright += list((r.targets[:, 2] - truth[match, 2]) / r.uncertainty[:, 3])
    assert len(z_pos) > 400
    assert 0.8 < np.std(z_pos) < 1.2
    assert 0.75 < np.std(z_bright) < 1.25


def test_a_rejected_fit_has_no_uncertainty():
    frames = window(DIAMOND, quantize=True)
    r = fit_window(frames, DIAMOND, FitConfig(max_reduced_chi2=1e-9))  # any misfit is too much
    assert not r.accepted and r.uncertainty.shape == (0, 4) and np.isnan(r.count_confidence)


def clutter(std: float, length: float, seed: int, pedestal: float = 40.0) -> np.ndarray:
    """A static clutter background (11, 11): white noise smoothed by a Gaussian of ``length``
    px, scaled to standard deviation ``std`` over the patch, on ``pedestal``."""
    from scipy.ndimage import gaussian_filter

    z = gaussian_filter(np.random.default_rng(seed).standard_normal((31, 31)), length, mode="wrap")[10:21, 10:21]
    return pedestal + std * (z - z.mean()) / z.std()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clutter_is_marginalised_as_a_random_field(seed):
    # three targets on clutter of std 20 grey levels that varies over ~2 px: a plane cannot
    # follow it, and its bumps are as bright as the targets' peaks
    truth = DIAMOND[:3]
    frames = window(truth) + clutter(20.0, 1.5, seed)
    frames = np.stack([physics.quantize(f) for f in frames]).astype(np.float64)
    start = perturbed(truth, seed=seed, px=0.08)
    r = fit_window(frames, start)
    assert r.accepted, r.reason
    assert r.k_final == 3
    assert match_error(r.targets, truth) < 0.08
    # the plane alone: the wrong count, a worse answer, or the peaks back
    plane = fit_window(frames, start, FitConfig(clutter=False))
    assert (
        not plane.accepted
        or plane.k_final != 3
        or match_error(plane.targets, truth) > 2 * match_error(r.targets, truth)
    )


def edge_background(truth: np.ndarray, seed: int) -> np.ndarray:
    """A static background (11, 11): pedestal 30 and a straight blurred step of contrast 30-80
    grey levels whose line passes 0.5-1.5 px from the group ``truth``, in any direction."""
    rng = np.random.default_rng(seed)
    angle, side = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5) * rng.choice([-1, 1])
    normal = np.array([np.cos(angle), np.sin(angle)])
    offset = float((truth[:, :2].mean(axis=0) - 5.0) @ normal + side)
    edge = Edge(angle, offset, rng.uniform(0.3, 0.8), rng.uniform(30, 80))
    return 30.0 + edge.contrast * edge_column(edge, 11, 11).reshape(11, 11)


def test_an_edge_beside_the_targets_is_a_background_term():
    # a horizon or a cloud's rim a pixel from the group: no plane follows the step, and the
    # clutter model (a stationary field) takes it for structure everywhere; the edge term
    # places it from the far pixels and fits its contrast with the targets
    truth = DIAMOND[:3]
    found, plain = [], []
    for seed in range(8):
        frames = window(truth, noise=1.0, seed=seed) + edge_background(truth, seed)
        frames = np.stack([physics.quantize(f) for f in frames]).astype(np.float64)
        start = perturbed(truth, seed=seed, px=0.08)
        r = fit_window(frames, start)
        assert r.accepted and r.k_final == 3, (seed, r.reason, r.k_final)
        assert r.edge is not None
        found.append(match_error(r.targets, truth))
        without = fit_window(frames, start, FitConfig(edges=False))
        ok = without.accepted and without.k_final == 3
        plain.append(match_error(without.targets, truth) if ok else np.inf)
    assert max(found) < 0.1
    assert np.mean(plain) > 1.5 * np.mean(found)


@pytest.mark.parametrize("seed", range(4))
def test_an_edge_off_the_crop_keeps_its_contrast_and_the_frames_noise(seed):
    # the step cuts a corner far from the group: the crop lies on one side of it, where its
    # column is flat and alone cannot tell the step's height from the plane's level; the far
    # pixels' contrast (a prior) keeps it, and the noise stays the frames' own
    truth = DIAMOND[:3]
    edge = Edge(angle=np.pi / 4, offset=4.5, blur=0.5, contrast=60.0)
    frames = window(truth, noise=1.0, seed=seed) + 30.0 + 60.0 * edge_column(edge, 11, 11).reshape(11, 11)
    frames = np.stack([physics.quantize(f) for f in frames]).astype(np.float64)
    start = perturbed(truth, seed=seed, px=0.08)
    win = _Window(frames, TIMES, start, FitConfig())
    assert win.edge is not None and win.clutter is None
    assert win.noise == pytest.approx(1.0, abs=0.15)
    r = fit_window(frames, start)
    assert r.accepted and r.k_final == 3
    assert r.edge[3] == pytest.approx(60.0, rel=0.1)
    assert r.background[0] == pytest.approx(30.0 + 60.0 * edge_column(edge, 11, 11)[60], abs=3.0)


def test_uncertainties_under_clutter_are_calibrated():
    """On clutter (std 5-20, correlation 1-2 px) with noise sigma 2, the fit counts right and
    its normalised errors spread about 1; the plane alone (clutter=False) fails the count and
    error bounds."""
    rng = np.random.default_rng(12)
    z_pos, z_bright, errors, right = [], [], [], 0
    for _ in range(80):
        k = int(rng.integers(2, 5))
        angle, dist, centre = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.6), rng.uniform(4.0, 6.0, 2)
        dirs = np.array([[np.cos(angle + j * np.pi / 2), np.sin(angle + j * np.pi / 2)] for j in range(k)])
        truth = np.column_stack([centre + dist * dirs, np.clip(rng.normal(235, 20, k), 201, 269)])
        frames = window(truth, velocity=rng.uniform(-0.05, 0.05, 2), noise=2.0, seed=int(rng.integers(1e9)))
        background = clutter(rng.uniform(5, 20), rng.uniform(1.0, 2.0), int(rng.integers(1e9)))
        frames = np.stack([physics.quantize(f) for f in frames + background]).astype(np.float64)
        start = truth.copy()
        start[:, :2] += rng.normal(0, 0.1, (k, 2))
        r = fit_window(frames, start)
        if not r.accepted or r.k_final != k:
            continue
        match = np.hypot(*(r.targets[:, None, :2] - truth[None, :, :2]).transpose(2, 0, 1)).argmin(axis=1)
        if len(set(match)) < k:
            continue
        right += 1
        errors += list((r.targets[:, :2] - truth[match, :2]).ravel())
        z_pos += list((r.targets[:, :2] - truth[match, :2]).ravel() / r.uncertainty[:, :2].ravel())
        z_bright += list((r.targets[:, 2] - truth[match, 2]) / r.uncertainty[:, 3])
    assert right >= 72
    assert np.sqrt(np.mean(np.square(errors))) < 0.055
    assert 0.8 < np.std(z_pos) < 1.2
    assert 0.75 < np.std(z_bright) < 1.25


def test_clutter_is_found_only_where_the_background_varies_beyond_the_noise():
    truth = DIAMOND[:3]
    kw = dict(cfg=FitConfig(), planes=None)
    cluttered = np.stack([physics.quantize(f) for f in window(truth) + clutter(15.0, 1.5, 3)]).astype(float)
    noisy = window(truth, quantize=True, noise=4.0, seed=2) + 30.0
    ramped = np.stack([physics.quantize(f) for f in window(truth) + ramp(30.0, 3.0, -2.0)]).astype(float)
    found = _Window(cluttered, TIMES, truth, **kw).clutter
    assert found is not None
    var, length, noise, shape, _ = found
    assert 0.5 * 15.0**2 < var < 1.5 * 15.0**2  # less what the plane takes
    assert 1.0 < length < 4.0
    assert noise < 0.5  # a static background: the noise is the frames' own, none here
    assert shape == "smooth"  # a blurred field, not a rough one
    assert _Window(noisy, TIMES, truth, **kw).clutter is None
    # noise clipped at a dark floor (the protocol's frames): the frames' deviations understate
    # the noise there, which must not read as clutter
    dark = window(truth, quantize=True, noise=4.0, seed=2)
    assert (dark == 0).mean() > 0.2
    assert _Window(dark, TIMES, truth, **kw).clutter is None
    assert _Window(ramped, TIMES, truth, **kw).clutter is None


@pytest.mark.parametrize("seed", range(6))
def test_a_saturated_packed_group_of_seven_is_counted(seed):
    # seven calibrated targets 0.45 px around a point: their core clips at 255, so the flux is
    # only a lower bound and fewer, brighter targets fit the frames nearly as well; the
    # calibration (its prior counts in the criterion) and growth past targets brighter than it
    # expects find all seven
    rng = np.random.default_rng(seed)
    ang = np.arange(7) * np.pi / 4
    truth = np.column_stack([5.1 + 0.45 * np.cos(ang), 4.9 + 0.45 * np.sin(ang), rng.uniform(220, 250, 7)])
    frames = window(truth, quantize=True)
    assert (frames >= 255).any()
    r = fit_window(frames, perturbed(truth, seed=seed, px=0.1))
    assert r.accepted, r.reason
    assert r.k_final == 7
    assert match_error(r.targets, truth) < 0.1


# ------------------------------------------------------------------------------ the C solver


def _cases():
    """Windows that exercise every part of the model: a clean group, noise, a saturated packed
    group, clutter, an edge, a hot pixel with a PSF off the calibration, dim targets
    (brightness free)."""
    ang = np.arange(7) * np.pi / 4
    seven = np.column_stack([5.1 + 0.45 * np.cos(ang), 4.9 + 0.45 * np.sin(ang), np.full(7, 235.0)])
    cluttered = np.stack([physics.quantize(f) for f in window(DIAMOND[:3]) + clutter(20.0, 1.5, 0)])
    hot = []
    for t in TIMES:
        img = physics.quantize(physics.pixel_response(DIAMOND[:2] + [0.0, -0.05 * t, 0.0], sigma=0.62) + 60.0)
        img[1, 9] = 250
        hot.append(img)
    edged = np.stack([physics.quantize(f) for f in window(DIAMOND[:3], noise=1.0) + edge_background(DIAMOND[:3], 3)])
    return {
        "edge": (edged.astype(np.float64), perturbed(DIAMOND[:3], px=0.08)),
        "clean": (window(DIAMOND, quantize=True), perturbed(DIAMOND)),
        "noisy": (window(DIAMOND, quantize=True, noise=3.0, seed=4), perturbed(DIAMOND)),
        "saturated": (window(seven, quantize=True), perturbed(seven, px=0.1)),
        "clutter": (cluttered.astype(np.float64), perturbed(DIAMOND[:3], px=0.08)),
        "hot pixel, wide PSF": (np.stack(hot).astype(np.float64), perturbed(DIAMOND[:2], px=0.08)),
        "dim": (window(DIAMOND[:3] * [1, 1, 0.42], quantize=True, noise=1.0, seed=8), perturbed(DIAMOND[:3])),
        "wings (a halo)": (haloed(DIAMOND[:3], 0.45, 3.0, seed=9), perturbed(DIAMOND[:3], px=0.08)),
    }


@pytest.mark.skipif(not refine.NATIVE, reason="service.kernels._fit is not built")
@pytest.mark.parametrize("case", list(_cases()))
def test_the_c_solver_gives_the_numpy_solvers_answer(case):
    frames, start = _cases()[case]
    native = fit_window(frames, start)
    reference = fit_window(frames, start, FitConfig(solver="lm-numpy"))
    assert native.accepted == reference.accepted and native.k_final == reference.k_final
    np.testing.assert_allclose(native.targets, reference.targets, atol=1e-6)
    assert native.nfev == reference.nfev
    assert native.psf_sigma == pytest.approx(reference.psf_sigma, abs=1e-8)
    assert native.psf_halo == reference.psf_halo
    if case == "wings (a halo)":
        assert native.psf_halo > 0


def test_a_built_extension_is_used():
    # an extension that imports but lacks an entry point is taken for one built from older
    # source, and the numpy solvers run instead: the current build must not look like that
    try:
        from service.kernels import _fit  # noqa: F401
    except ImportError:
        pytest.skip("service.kernels._fit is not built")
    from service.science import background

    assert refine.NATIVE and background.NATIVE_EDGE


@pytest.mark.skipif(not refine.NATIVE, reason="service.kernels._fit is not built")
def test_the_c_solver_refuses_bad_buffers():
    from service.kernels import _fit

    z = np.zeros
    args = [z(5), z(5), z(5), z(5), z(5), z(5 * 9), z(5 * 9), z(5 * 9), z(5 * 9 * 3), z(0), z(0), z(0), z(0)]
    ints = [1, 3, 3, 4, 4, 0, 0, 10]
    nfev, chi2 = _fit.lm(*args, *ints, 1.0, 0.5, 1e-4)  # a well-formed call runs
    assert nfev >= 1 and chi2 >= 0
    bad = list(args)
    bad[5] = z(7)
    with pytest.raises(ValueError, match="obs"):
        _fit.lm(*bad, *ints, 1.0, 0.5, 1e-4)
    bad = list(args)
    bad[0] = z(5, dtype=np.float32)
    with pytest.raises(TypeError, match="theta"):
        _fit.lm(*bad, *ints, 1.0, 0.5, 1e-4)
    with pytest.raises(ValueError, match="bad dimensions"):
        _fit.lm(*args, 0, 3, 3, 4, 4, 0, 0, 10, 1.0, 0.5, 1e-4)
    with pytest.raises(ValueError, match="halo"):
        _fit.lm(*args, *ints, 1.0, 0.5, 1e-4, 1.0, 2.0)
    with pytest.raises(ValueError, match="halo"):
        _fit.lm(*args, *ints, 1.0, 0.5, 1e-4, 0.3, 0.0)


def test_more_targets_than_the_c_solver_takes_run_in_numpy():
    # 21 targets: 69 parameters, past the C solver's 64; the fit still answers
    rng = np.random.default_rng(2)
    truth = np.column_stack([rng.uniform(1.5, 8.5, 21), rng.uniform(1.5, 8.5, 21), rng.uniform(220, 250, 21)])
    frames = window(truth, quantize=True)
    r = fit_window(frames, truth, FitConfig(max_targets=21, try_counts=False))
    assert r.k_final == 21 and np.isfinite(r.targets).all()


# ------------------------------------------------------------------------------ the information bound


def test_the_position_bound_is_the_spread_of_an_efficient_fit():
    # one bright target on a pedestal, noise 2: the fit is efficient, so the spread of its
    # positions over noise draws is the bound
    truth = np.array([[5.1, 4.8, 240.0]])
    bound = position_bound(window(truth, noise=2.0) + 30.0, truth, VELOCITY, FitConfig(prior_px=None), TIMES)
    assert bound.shape == (1, 3) and abs(bound[0, 2]) < 0.2
    found = []
    for seed in range(60):
        frames = np.rint(window(truth, noise=2.0, seed=100 + seed) + 30.0)
        r = fit_window(frames, truth, FitConfig(prior_px=None))
        assert r.accepted and r.k_final == 1
        found.append(r.targets[0, :2])
    spread = np.std(np.array(found), axis=0)
    np.testing.assert_allclose(spread, bound[0, :2], rtol=0.3)
    # the fit's own uncertainty is the same Fisher information at its answer
    assert r.uncertainty[0, 0] == pytest.approx(bound[0, 0], rel=0.2)


def test_the_position_bound_grows_as_targets_pack_and_is_empty_without_targets():
    def bound(separation: float, config: FitConfig = FitConfig()) -> float:
        truth = np.array([[5.0 - separation / 2, 5.0, 235.0], [5.0 + separation / 2, 5.0, 235.0]])
        frames = np.rint(window(truth, noise=2.0, seed=3) + 20.0)
        return float(position_bound(frames, truth, VELOCITY, config)[:, 0].max())

    free = FitConfig(brightness_prior=None)
    assert bound(1.2, free) < 0.04  # resolved: a few hundredths of a pixel at noise 2
    # 0.3 px apart, the frames alone barely separate them: where the flux sits between two
    # targets trades against where they are
    assert bound(0.3, free) > 5 * bound(1.2, free)
    # the brightness calibration tells the frames how the flux is shared
    assert bound(0.3) < 0.2 * bound(0.3, free)
    truth = np.array([[4.4, 5.0, 235.0]])
    assert position_bound(window(truth, quantize=True), np.zeros((0, 3))).shape == (0, 3)


# ------------------------------------------------------------------------------ missed targets

# four targets 2-3 px apart; the network's cells (three per target, on its 1/3-px grid) found three
APART = np.array([[3.0, 3.2, 235.0], [6.2, 3.0, 228.0], [4.6, 5.6, 241.0], [7.4, 6.8, 232.0]])
CELLS = np.array([[0.0, 0.0], [1 / 3, 0.0], [0.0, 1 / 3]])


def test_a_target_the_network_missed_is_found_from_the_light_the_fit_leaves(monkeypatch):
    frames = window(APART, quantize=True, noise=1.0, seed=4)
    peaks = np.vstack([np.column_stack([np.round(t[:2] * 3) / 3 + CELLS, np.full(3, 80.0)]) for t in APART[:3]])
    r = fit_window(frames, peaks)
    assert r.accepted and r.k_final == 4 and r.k_start == 9
    assert match_error(r.targets, APART) < 0.05
    # without looking past its targets, every start comes from the cells and the fit gives up
    monkeypatch.setattr(refine, "_missed", lambda *args, **kwargs: None)
    r = fit_window(frames, peaks)
    assert not r.accepted and "reduced chi2" in r.reason


def test_a_defect_or_clutter_is_no_missed_target():
    frames = window(APART[:3], quantize=True, noise=1.0, seed=5)
    result = fit_window(frames, APART[:3], FitConfig(max_reduced_chi2=1e9))
    fit = refine._Fit(
        result.targets, np.array(result.velocity), 0.0, 0.0, 0, 0, None, None, np.zeros(3), 0.5, None, None
    )
    planes = fit_planes(frames)[0]
    scale = result.noise
    peaks = np.vstack([APART[:3], [[1.0, 9.0, 80.0]]])  # the last with no light under it
    assert refine._missed(frames, planes, fit, TIMES, scale, peaks) is None  # all light explained
    hot = frames.copy()
    hot[:, 8, 8] = 200.0  # one pixel of its own, in every frame
    assert refine._missed(hot, planes, fit, TIMES, scale, peaks) is None
    lit = frames + physics.pixel_response([[8.0, 8.0, 230.0]])  # a target there
    found = refine._missed(lit, planes, fit, TIMES, scale, peaks)
    assert found is not None and len(found) == 4
    np.testing.assert_array_equal(found[:3], APART[:3])  # the peaks on light, then the spot
    assert np.hypot(found[3, 0] - 8.0, found[3, 1] - 8.0) < 0.1


def test_a_target_beyond_its_starts_reach_is_reached(monkeypatch):
    # the network's cells carpet three targets and miss the fourth, 1.3 px from the nearest
    # cell: the start meant for it stops at its bound (0.5 px) and the window misfits
    truth = np.array([[5.09, 5.85, 233.0], [5.84, 4.64, 226.0], [4.18, 4.2, 226.0], [5.45, 5.51, 239.0]])
    frames = window(truth, quantize=True, noise=1.0, seed=6)
    grid = np.arange(5.0, 6.01, 1 / 3)
    cells = np.array([[x, y, 90.0] for x in grid for y in np.arange(4.67, 6.01, 1 / 3)])
    r = fit_window(frames, cells)
    assert r.accepted and r.k_final == 4
    assert match_error(r.targets, truth) < 0.05
    # without the targets freed past their reach, the frame terms take the misfit up instead,
    # with a wrong count
    monkeypatch.setattr(refine, "_unbound", lambda best_win, best, fits, scale: (best, 0))
    assert fit_window(frames, cells).k_final != 4
