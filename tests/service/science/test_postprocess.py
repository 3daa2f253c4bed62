import numpy as np
import pytest

from service.science import physics
from service.science.peaks import extract_peaks_batch
from service.science.physics import flux_noise
from service.science.postprocess import REFINE_MODES, find_targets, snr_thresholds
from training.simulate import SimParams, render, simulate_trajectory


def simulated_windows(n: int, seed: int = 11):
    """n 8-bit windows, the true HR map of each middle frame, and the middle frame's truth."""
    rng = np.random.default_rng(seed)
    wins, maps, truth = [], [], []
    for _ in range(n):
        frames, targets = simulate_trajectory(rng, SimParams())
        images = render(frames, 0.0, rng, False).astype(np.float64)
        t = int(rng.integers(2, 18))
        wins.append(images[t - 2 : t + 3])
        maps.append(physics.hr_map(targets[t]))
        truth.append(targets[t])
    return np.stack(wins), np.stack(maps), truth


def test_modes():
    assert REFINE_MODES == ("none", "centroid", "quadratic", "fit")


def test_map_refinements_are_the_peaks_module():
    _, maps, _ = simulated_windows(4)
    for refine in ("none", "centroid", "quadratic"):
        got = find_targets(maps, refine=refine)
        for a, b in zip(got, extract_peaks_batch(maps, refine=refine)):
            np.testing.assert_array_equal(a, b)


def test_fit_moves_cell_centres_onto_the_targets():
    wins, maps, truth = simulated_windows(6)
    cells = find_targets(maps, refine="none")
    fitted = find_targets(maps, wins, refine="fit")

    def mean_error(found):
        errs = []
        for f, t in zip(found, truth):
            d = np.linalg.norm(f[:, None, :2] - t[None, :, :2], axis=-1)
            errs.extend(d.min(axis=1))
        return float(np.mean(errs))

    assert all(len(f) == len(t) for f, t in zip(fitted, truth))
    # cell centres are ~0.1 px off; 4 targets within 0.6 px in 8-bit frames leave the fit
    # a few hundredths of a pixel of ambiguity
    assert mean_error(fitted) < 0.04 and mean_error(cells) > 0.08
    assert all(np.all(np.diff(f[:, 2]) <= 0) for f in fitted)  # brightest first
    capped = find_targets(maps, wins, refine="fit", max_targets=1)
    assert all(len(f) == 1 for f in capped)


def test_fit_needs_windows_and_bad_refine_is_named():
    _, maps, _ = simulated_windows(1)
    with pytest.raises(ValueError, match="window"):
        find_targets(maps, refine="fit")
    with pytest.raises(ValueError, match="refine"):
        find_targets(maps, refine="magic")


def test_the_fit_leaves_missing_pixels_out():
    """Pixels a registered frame does not cover hold a repeated edge, not the scene: marked
    missing, the fit answers as on the true frames, where left in they pull it off."""
    wins, maps, truth = simulated_windows(6, seed=5)
    clean = find_targets(maps, wins, refine="fit")
    spoiled = wins.copy()
    spoiled[:, 0, :, :3] = 180.0  # the first frame's 3 left columns: what a shifted frame repeats
    missing = np.zeros((len(wins), 11, 11), dtype=bool)
    missing[:, :, :3] = True
    kept = find_targets(maps, spoiled, refine="fit", missing=missing)
    for a, b, t in zip(kept, clean, truth, strict=True):
        assert len(a) == len(b) == len(t)
        np.testing.assert_allclose(a[:, :2], b[:, :2], atol=0.02)
    left_in = find_targets(maps, spoiled, refine="fit")
    assert any(len(a) != len(t) or np.abs(a[:, :2] - b[:, :2]).max() > 0.02 for a, b, t in zip(left_in, clean, truth))
    with pytest.raises(ValueError, match="missing"):
        find_targets(maps, wins, refine="fit", missing=missing[:, :5])


def test_peaks_on_missing_pixels_are_dropped():
    wins, maps, _ = simulated_windows(2, seed=8)
    maps = maps.copy()
    maps[:, 16, 1] = 500.0  # a bright cell on LR column 0 (HR column 1), row 5
    missing = np.zeros((2, 11, 11), dtype=bool)
    missing[:, :, 0] = True  # column 0 is a repeated edge
    with_cell = find_targets(maps, wins, refine="none", snr=5.0)
    without = find_targets(maps, wins, refine="none", snr=5.0, missing=missing)
    for a, b in zip(with_cell, without, strict=True):
        assert np.any(np.isclose(a[:, 0], 0.0)) and not np.any(np.isclose(b[:, 0], 0.0))
        assert len(b) == len(a) - 1
    with pytest.raises(ValueError, match="missing"):
        find_targets(maps, refine="none", missing=missing)


def test_the_snr_threshold_counts_the_sensor_noise_not_static_clutter():
    """A target on clutter that varies more than its noise: the threshold is 5 flux sigmas of the
    frame-to-frame noise, so a peak the clutter's spread would have hidden is kept."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(4)
    z = gaussian_filter(rng.standard_normal((11, 11)), 1.0)
    clutter = 60.0 + 20.0 * (z - z.mean()) / z.std()
    wins = np.stack([physics.quantize(clutter + 2.0 * rng.standard_normal((11, 11))) for _ in range(5)])[None]
    noise = np.sqrt(2.0**2 + 1 / 12)
    maps = np.zeros((1, 33, 33))
    maps[0, 16, 16] = 5.0 * flux_noise(noise) * 1.5  # 1.5 x the threshold of the noise
    maps[0, 10, 10] = 5.0 * flux_noise(noise) * 0.5  # half of it
    found = find_targets(maps, wins.astype(float), refine="none", snr=5.0)[0]
    assert found.shape == (1, 3) and found[0, :2] == pytest.approx([5.0, 5.0])
    # the clutter's spread about the plane, taken for noise, would have set it above both
    spread = np.median(np.std(wins - wins.mean(axis=(2, 3), keepdims=True), axis=(2, 3)))
    assert 5.0 * flux_noise(spread) > maps[0, 16, 16]
    with pytest.raises(ValueError, match="one value per window"):
        snr_thresholds(np.ones((1, 5)), 5.0)  # per frame: the old signature


def test_a_window_of_one_repeated_frame_takes_its_threshold_from_the_spread():
    """A track of one frame so far fills its window with copies: no noise shows over time, so
    the threshold comes from the frame's spread about its plane, not from the 1-grey-level floor."""
    rng = np.random.default_rng(9)
    frame = physics.quantize(40.0 + 5.0 * rng.standard_normal((11, 11)))
    wins = np.repeat(frame[None, None], 5, axis=1).astype(float)
    maps = np.zeros((1, 33, 33))
    maps[0, 16, 16] = 30.0  # above the floor's threshold (8.9), below 5 flux sigmas of noise 5 (44)
    assert find_targets(maps, wins, refine="none", snr=5.0)[0].shape == (0, 3)
