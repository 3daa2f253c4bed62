"""Tests of service.science.background: the robust background plane and the network's input."""

from __future__ import annotations

import numpy as np
import pytest

from service.science import physics
from service.science.background import condition, fit_planes, plane_image

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
