import numpy as np
import pytest
from scipy import integrate

from service.science import physics


def numeric_pixel(x, y, a, r, c, sigma=0.5):
    """Brute-force double integral of the Gaussian PSF over pixel (r, c)."""

    def f(v, u):
        return np.exp(-((u - x) ** 2 + (v - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)

    val, _ = integrate.dblquad(f, c - 0.5, c + 0.5, r - 0.5, r + 0.5, epsabs=1e-13, epsrel=1e-13)
    return a * val


def test_matches_numerical_double_integration():
    rng = np.random.default_rng(7)
    for _ in range(4):
        x, y = rng.uniform(1, 9, size=2)
        a = rng.uniform(220, 250)
        img = physics.pixel_response([[x, y, a]])
        r0, c0 = int(round(y)), int(round(x))
        for r in range(r0 - 1, r0 + 2):
            for c in range(c0 - 1, c0 + 2):
                assert img[r, c] == pytest.approx(numeric_pixel(x, y, a, r, c), abs=1e-9)


def test_energy_conserved_far_from_border():
    img = physics.pixel_response([[5.2, 4.7, 240.0]])
    assert img.sum() == pytest.approx(240.0, rel=1e-12)
    # a target on the border loses about half its energy outside the patch
    edge = physics.pixel_response([[-0.5, 5.0, 100.0]])
    assert edge.sum() == pytest.approx(50.0, rel=1e-9)


def test_symmetry_and_convention():
    img = physics.pixel_response([[5.0, 5.0, 1.0]])
    np.testing.assert_allclose(img, img.T, atol=1e-15)
    np.testing.assert_allclose(img, img[::-1, :], atol=1e-15)
    np.testing.assert_allclose(img, img[:, ::-1], atol=1e-15)
    # x is the column, y the row: a target right of centre brightens column 6, not row 6
    shifted = physics.pixel_response([[5.4, 5.0, 1.0]])
    assert shifted[5, 6] > shifted[6, 5]
    # mirror symmetry about the pixel centre: (5+d, 5) mirrors (5-d, 5)
    left = physics.pixel_response([[4.6, 5.0, 1.0]])
    np.testing.assert_allclose(shifted, left[:, ::-1], atol=1e-15)


def test_superposition_and_empty():
    a = physics.pixel_response([[3.1, 4.2, 200.0]])
    b = physics.pixel_response([[6.3, 2.9, 230.0]])
    both = physics.pixel_response([[3.1, 4.2, 200.0], [6.3, 2.9, 230.0]])
    np.testing.assert_allclose(both, a + b, atol=1e-12)
    assert physics.pixel_response([]).shape == (11, 11)
    assert physics.pixel_response([]).sum() == 0
    with pytest.raises(ValueError, match="shape"):
        physics.pixel_response([1.0, 2.0])


def test_hr_grid_rule():
    centres = physics.hr_centers()
    assert centres.shape == (33,)
    np.testing.assert_allclose(centres, (np.arange(33) - 1) / 3)
    # the 33 cells tile [-0.5, 10.5] exactly
    assert centres[0] - 1 / 6 == pytest.approx(-0.5)
    assert centres[-1] + 1 / 6 == pytest.approx(10.5)
    np.testing.assert_array_equal(physics.lr_to_hr_index(centres), np.arange(33))
    np.testing.assert_allclose(physics.hr_to_lr(np.arange(33)), centres)
    # general ratio: cell centres at (i + 0.5) / ratio - 0.5
    np.testing.assert_allclose(physics.hr_centers(4, 5), (np.arange(20) + 0.5) / 5 - 0.5)


def test_sampling_matrix_columns_are_pixel_responses():
    phi = physics.sampling_matrix()
    assert phi.shape == (121, 1089)
    rng = np.random.default_rng(0)
    for k in rng.choice(1089, size=25, replace=False):
        i, j = divmod(k, 33)
        x, y = (j - 1) / 3, (i - 1) / 3
        np.testing.assert_allclose(phi[:, k], physics.pixel_response([[x, y, 1.0]]).ravel(), atol=1e-14)


def test_sampling_matrix_maps_hr_maps_to_images():
    targets = np.array([[5.0, 5.0, 240.0], [5 + 1 / 3, 4 + 2 / 3, 225.0]])
    hr = physics.hr_map(targets)
    assert hr[16, 16] == 240.0 and hr[15, 17] == 225.0 and hr.sum() == 465.0
    lr = (physics.sampling_matrix() @ hr.ravel()).reshape(11, 11)
    np.testing.assert_allclose(lr, physics.pixel_response(targets), atol=1e-10)


def test_pixel_fractions_grad_matches_finite_difference():
    pos = np.array([3.3, 7.81])
    eps = 1e-6
    num = (physics.pixel_fractions(pos + eps) - physics.pixel_fractions(pos - eps)) / (2 * eps)
    np.testing.assert_allclose(physics.pixel_fractions_grad(pos), num, atol=1e-8)


def test_quantize_rounds_and_clips():
    img = np.array([[-3.0, 0.4, 0.6, 254.5, 300.0]])
    np.testing.assert_array_equal(physics.quantize(img), [[0, 0, 1, 254, 255]])
    assert physics.quantize(img).dtype == np.uint8
