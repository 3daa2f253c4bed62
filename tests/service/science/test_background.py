"""Tests of service.science.background: the robust background plane and the network's input."""

from __future__ import annotations

import numpy as np
import pytest

from service.science import background, physics
from service.science.background import (
    Edge,
    condition,
    defects,
    edge_column,
    fit_edge,
    fit_planes,
    plane_basis,
    plane_image,
    temporal_noise,
)

GROUP = np.array([[5.3, 4.9, 160.0], [4.7, 5.0, 150.0], [5.0, 5.3, 155.0]])


def frames_with(background: np.ndarray, noise: float, seed: int = 0, n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = physics.pixel_response(GROUP) + background
    return np.stack([physics.quantize(img + noise * rng.standard_normal(img.shape)) for _ in range(n)]).astype(float)


@pytest.mark.parametrize("coef", [(30.0, 0.0, 0.0), (60.0, 3.0, -2.0), (100.0, -1.0, 4.0)])
@pytest.mark.parametrize("noise", [0.0, 3.0])
def test_the_plane_under_bright_targets_is_recovered(coef, noise):
    frames = frames_with(plane_image(np.array(coef), 11, 11), noise)
    got, sigma = fit_planes(frames)
    assert got.shape == (5, 3) and sigma.shape == (5,)
    # targets hold 3 of 121 pixels' worth of brightness but are ignored; noise 3 moves the fit
    # by about sigma / sqrt(pixels)
    np.testing.assert_allclose(got, np.broadcast_to(coef, (5, 3)), atol=0.15 + 0.25 * noise)
    if noise:
        np.testing.assert_allclose(sigma, noise, rtol=0.35)


@pytest.mark.parametrize("noise", [0.0, 2.0])
def test_a_dark_clipped_patch_is_left_as_it_is(noise):
    """A patch whose noise was clipped at 0 (the protocol's): the plane is 0, the input unchanged."""
    frames = frames_with(np.zeros((11, 11)), noise, seed=3)
    coef, _ = fit_planes(frames)
    assert np.abs(coef).max() < 0.05
    np.testing.assert_allclose(condition(frames), frames, atol=0.6)


def test_condition_removes_the_background_frame_by_frame():
    bg = plane_image(np.array([20.0, 2.0, 1.0]), 11, 11)
    frames = frames_with(bg, 0.0)
    out = condition(frames)
    assert out.dtype == np.float32 and out.min() >= 0.0
    assert frames.max() < 255  # (a saturated pixel would stay clipped, less its background)
    np.testing.assert_allclose(out, frames_with(np.zeros((11, 11)), 0.0), atol=1.0)
    # each frame on its own gives the same: the service conditions streamed frames one by one
    np.testing.assert_array_equal(np.stack([condition(f) for f in frames]), out)
    np.testing.assert_array_equal(condition(frames[None])[0], out)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="H, W"):
        fit_planes(np.zeros(11))


def stuck_frames(sigma_psf: float, brightness: float, seed: int = 0) -> np.ndarray:
    """5 frames on a 20-grey-level pedestal, noise 2: two moving targets (one right next to a
    dead pixel), a hot pixel at (1, 9), a dead one at (8, 2), a pixel hot in two frames only
    at (9, 9)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(5):
        targets = np.array([[5.0 + 0.05 * t, 5.0, brightness], [2.0, 7.0 + 0.04 * t, brightness]])
        img = physics.pixel_response(targets, sigma=sigma_psf) + 20.0 + rng.normal(0.0, 2.0, (11, 11))
        img[1, 9], img[8, 2] = 200.0, 0.0
        if t < 2:
            img[9, 9] = 200.0
        out.append(physics.quantize(img))
    return np.stack(out).astype(float)


@pytest.mark.parametrize("sigma_psf", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("brightness", [30.0, 250.0])
def test_stuck_pixels_are_found_and_targets_are_not(sigma_psf, brightness):
    frames = stuck_frames(sigma_psf, brightness)
    coef, sigma = fit_planes(frames)
    found = defects(frames, coef, sigma, min_psf_sigma=0.3)
    assert found.shape == (11, 11)
    assert {tuple(int(v) for v in p) for p in np.argwhere(found)} == {(1, 9), (8, 2)}
    # batched over windows, the same
    np.testing.assert_array_equal(defects(frames[None], coef[None], sigma[None], 0.3)[0], found)


def test_the_dark_side_of_an_edge_is_not_dead_and_dead_pixels_side_by_side_are():
    # a step of 80 grey levels cutting off a corner: the median plane follows the bright side,
    # so the dark corner stands many sigmas below it in every frame, but it is a region, not a
    # pixel
    edge = Edge(angle=2.2, offset=-3.0, blur=0.4, contrast=80.0)
    frames = frames_with(20.0 + edge.contrast * edge_column(edge, 11, 11).reshape(11, 11), 1.0, seed=4)
    coef, sigma = fit_planes(frames)
    assert (frames - plane_image(coef, 11, 11) < -5 * np.maximum(sigma, 1.0)[:, None, None]).all(axis=0).sum() > 10
    assert not defects(frames, coef, sigma, 0.3).any()
    frames[:, 8, 2] = frames[:, 8, 3] = 0.0  # two dead pixels next to each other, on the bright side
    coef, sigma = fit_planes(frames)
    assert {tuple(int(v) for v in p) for p in np.argwhere(defects(frames, coef, sigma, 0.3))} == {(8, 2), (8, 3)}


def test_a_pixel_stuck_in_one_frame_is_not_a_defect():
    frames = stuck_frames(0.5, 200.0)
    frames[:, 1, 9] = frames[:, 0, 9]  # the hot pixel is gone...
    frames[2, 1, 9] = 200.0  # ...but for one frame
    coef, sigma = fit_planes(frames)
    assert not defects(frames, coef, sigma, 0.3)[1, 9]


def test_planes_leave_out_pixels_without_data():
    """A frame shifted into another patch repeats its edge where it has no data: fitted with
    those pixels the slope flattens, left out it is the scene's."""
    from service.science.windows import register

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:11, 0:11]
    scene = 50.0 + 3.0 * xx + 1.0 * yy + rng.normal(0.0, 1.0, (11, 11))
    shifted, missing = register(scene, (-4, 0))  # the other patch lies 4 px left: 4 columns repeat
    true_slope = fit_planes(scene)[0][1]
    assert true_slope == pytest.approx(3.0, abs=0.1)
    assert fit_planes(shifted)[0][1] < 2.5
    assert fit_planes(shifted, ~missing)[0][1] == pytest.approx(3.0, abs=0.15)
    # per frame of a stack, broadcast
    coef, sigma = fit_planes(np.stack([scene, shifted]), ~missing[None])
    assert coef[:, 1] == pytest.approx([3.0, 3.0], abs=0.15) and np.all(sigma > 0.5)


def static_clutter(std: float, seed: int) -> np.ndarray:
    """A background (11, 11) of std ``std`` that varies from pixel to pixel, on a pedestal."""
    from scipy.ndimage import gaussian_filter

    z = gaussian_filter(np.random.default_rng(seed).standard_normal((11, 11)), 1.0)
    return 80.0 + std * (z - z.mean()) / z.std()


@pytest.mark.parametrize("noise", [1.0, 3.0])
def test_temporal_noise_is_the_sensor_noise_and_not_the_static_clutter(noise):
    wins = np.stack([frames_with(static_clutter(20.0, s), noise, seed=s) for s in range(6)])
    got = temporal_noise(wins)
    assert got.shape == (6,)
    np.testing.assert_allclose(got, np.sqrt(noise**2 + 1 / 12), rtol=0.3)  # rounding adds 1/12
    # the spread about each frame's plane counts the clutter too
    assert np.all(fit_planes(wins)[1] > 5.0)
    # a frame's offset as a whole (gain control flicker) is not noise
    flicker = wins + np.array([0.0, 12.0, -7.0, 20.0, 3.0])[None, :, None, None]
    np.testing.assert_allclose(temporal_noise(flicker), got, rtol=0.05)


def test_temporal_noise_leaves_replicated_frames_and_missing_pixels_out():
    wins = np.stack([frames_with(static_clutter(20.0, s), 3.0, seed=s) for s in range(4)])
    honest = temporal_noise(wins)
    padded = wins.copy()
    padded[:, :2] = padded[:, 2:3]  # a track's first frame: its window repeats it twice
    # three distinct frames of the same noise: the same estimate within its sampling error
    np.testing.assert_allclose(temporal_noise(padded), honest, rtol=0.3)
    # copies counted as frames would shrink the deviations
    zeroed = np.quantile(padded - padded.mean(axis=1, keepdims=True), [0.25, 0.75], axis=(1, 2, 3))
    assert np.all((zeroed[1] - zeroed[0]) / 1.349 < 0.8 * honest)
    # one distinct frame: no noise to see
    assert np.all(np.isnan(temporal_noise(np.repeat(wins[:, :1], 5, axis=1))))
    # a column repeated from the edge of a shifted frame differs between frames by far more
    # than the noise; marked missing it is left out
    spoiled = wins.copy()
    spoiled[:, 0, :, :4] += 60.0
    valid = np.ones((4, 11, 11), dtype=bool)
    valid[:, :, :4] = False
    assert np.all(temporal_noise(spoiled) > 1.3 * honest)
    np.testing.assert_allclose(temporal_noise(spoiled, valid), honest, rtol=0.3)
    # no valid pixel: nothing to see either
    assert np.all(np.isnan(temporal_noise(wins, np.zeros((4, 11, 11), dtype=bool))))
    with pytest.raises(ValueError, match="windows"):
        temporal_noise(wins[0])
    with pytest.raises(ValueError, match="valid"):
        temporal_noise(wins, valid[:, None])


# ------------------------------------------------------------------------------ edges


def far_mask() -> np.ndarray:
    """The pixels of an 11 x 11 patch outside a 5 x 5 crop (the fit's far pixels)."""
    mask = np.ones((11, 11), dtype=bool)
    mask[3:8, 4:9] = False
    return mask


@pytest.mark.parametrize("seed", range(8))
def test_an_edge_is_placed_from_the_pixels_around_a_crop(seed):
    rng = np.random.default_rng(seed)
    # any direction, either sign of contrast, a tilted plane under it, noise 1.5
    truth = Edge(rng.uniform(0, 2 * np.pi), rng.uniform(-2, 2), rng.uniform(0.3, 1.2), rng.uniform(15, 80))
    plane = np.array([40.0, rng.uniform(-2, 2), rng.uniform(-2, 2)])
    image = plane_basis(11, 11) @ plane + truth.contrast * edge_column(truth, 11, 11)
    mask = far_mask()
    edge, got_plane, rss, se = fit_edge(image[mask.ravel()] + rng.normal(0, 1.5, mask.sum()), mask)
    assert edge.contrast > 0 and 0 <= edge.angle < 2 * np.pi
    # the same line, rising the same way (the angle is the normal's, mod 2 pi)
    assert abs(np.angle(np.exp(1j * (edge.angle - truth.angle)))) < 0.05
    assert edge.offset == pytest.approx(truth.offset, abs=0.1 + 0.1 * truth.blur)
    assert edge.blur == pytest.approx(truth.blur, abs=0.1 + 0.15 * truth.blur)
    assert edge.contrast == pytest.approx(truth.contrast, rel=0.1)
    # the standard error the fit gives the contrast covers its error (noise sigma 1.5)
    assert 0 < se < np.inf and abs(edge.contrast - truth.contrast) < 4 * 1.5 * se
    assert np.all(np.abs(got_plane - plane) < [2.0, 0.3, 0.3]), got_plane
    assert rss < 2.0 * 1.5**2 * mask.sum()
    # the answer reproduces the patch, crop included
    model = plane_basis(11, 11) @ got_plane + edge.contrast * edge_column(edge, 11, 11)
    assert np.abs(model - image).max() < 6.0


def test_a_contrast_falling_along_the_normal_is_turned_round():
    mask = far_mask()
    falling = Edge(angle=0.5, offset=0.7, blur=0.5, contrast=-40.0)
    image = 60.0 + falling.contrast * edge_column(falling, 11, 11)
    edge, plane, _, _ = fit_edge(image[mask.ravel()], mask)
    assert edge.contrast == pytest.approx(40.0, rel=1e-3)
    assert edge.angle == pytest.approx(0.5 + np.pi, abs=1e-3) and edge.offset == pytest.approx(-0.7, abs=1e-3)
    np.testing.assert_allclose(plane + [edge.contrast, 0, 0], [60.0, 0, 0], atol=1e-2)
    model = plane_basis(11, 11) @ plane + edge.contrast * edge_column(edge, 11, 11)
    np.testing.assert_allclose(model, image, atol=1e-2)


def test_fit_edge_refuses_mismatched_values_and_gives_up_on_too_few_pixels():
    mask = far_mask()
    with pytest.raises(ValueError, match="one entry per masked pixel"):
        fit_edge(np.zeros(5), mask)
    few = np.zeros((11, 11), dtype=bool)
    few[0, :6] = True
    assert fit_edge(np.arange(6.0), few) is None


@pytest.mark.skipif(not background.NATIVE_EDGE, reason="service.kernels._fit is not built")
def test_the_c_edge_fit_gives_the_numpy_answer():
    rng = np.random.default_rng(5)
    mask = far_mask()
    for _ in range(60):
        truth = Edge(rng.uniform(0, 2 * np.pi), rng.uniform(-3, 3), rng.uniform(0.2, 1.5), rng.uniform(-80, 80))
        plane = np.array([40.0, rng.uniform(-3, 3), rng.uniform(-3, 3)])
        image = plane_basis(11, 11) @ plane + truth.contrast * edge_column(truth, 11, 11)
        z = image[mask.ravel()] + rng.normal(0, rng.uniform(0, 5), mask.sum())
        native, reference = fit_edge(z, mask), fit_edge(z, mask, native=False)
        assert (native is None) == (reference is None)
        if native is None:
            continue
        got = [*native.edge.__dict__.values(), *native.plane, native.rss, native.contrast_se]
        want = [*reference.edge.__dict__.values(), *reference.plane, reference.rss, reference.contrast_se]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # pure noise: both give the same answer, whatever it is
    z = rng.normal(0, 2, mask.sum())
    native, reference = fit_edge(z, mask), fit_edge(z, mask, native=False)
    assert (native is None) == (reference is None)


def test_the_c_edge_fit_refuses_bad_buffers():
    if not background.NATIVE_EDGE:
        pytest.skip("service.kernels._fit is not built")
    from service.kernels import _fit

    m = 20
    args = [np.zeros(9), np.zeros(m), np.zeros(m), np.zeros(m), np.zeros(3 * m), np.zeros(3), np.array([0.5])]
    assert _fit.edge_fit(*args, 1.0, 12, 1e-3, -3.0, 3.0) in (True, False)  # a well-formed call runs
    with pytest.raises(ValueError, match="q"):
        _fit.edge_fit(*args[:4], np.zeros(m), *args[5:], 1.0, 12, 1e-3, -3.0, 3.0)
    with pytest.raises(ValueError, match="blurs must be > 0"):
        _fit.edge_fit(*args[:6], np.array([0.0]), 1.0, 12, 1e-3, -3.0, 3.0)
    with pytest.raises(TypeError, match="out"):
        _fit.edge_fit(np.zeros(9, dtype=np.float32), *args[1:], 1.0, 12, 1e-3, -3.0, 3.0)
