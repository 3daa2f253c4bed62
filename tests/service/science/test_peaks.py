"""Tests for service.science.peaks: peak extraction from the HR map, with hand-computed answers."""

from __future__ import annotations

import time
from collections import deque
from functools import partial

import numpy as np
import pytest

from service.science import peaks
from service.science.peaks import REFINE_MODES
from service.science.physics import hr_map, hr_to_lr

# Most of this file checks the local-maximum rule; mode="cells" has its own tests at the end.
extract_peaks = partial(peaks.extract_peaks, mode="local_max")
extract_peaks_batch = partial(peaks.extract_peaks_batch, mode="local_max")

N = 33  # HR map side for ratio 3 over an 11 x 11 patch


def lr(index: float) -> float:
    """LR coordinate of (fractional) HR cell index ``index`` for ratio 3."""
    return float(hr_to_lr(index))


def single(i: int, j: int, value: float = 230.0, n: int = N) -> np.ndarray:
    m = np.zeros((n, n))
    m[i, j] = value
    return m


# ---------------------------------------------------------------------------------------------
# Known answers


def test_refine_modes_constant():
    assert REFINE_MODES == ("none", "centroid", "quadratic")


@pytest.mark.parametrize("refine", REFINE_MODES)
def test_isolated_peak_at_centre_cell(refine):
    out = extract_peaks(single(16, 16), refine=refine)
    assert out.shape == (1, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out, [[5.0, 5.0, 230.0]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("refine", REFINE_MODES)
def test_isolated_peak_at_corner_cells(refine):
    out = extract_peaks(single(0, 0), refine=refine)
    np.testing.assert_allclose(out, [[-1 / 3, -1 / 3, 230.0]], rtol=0, atol=1e-12)
    out = extract_peaks(single(32, 32), refine=refine)
    np.testing.assert_allclose(out, [[31 / 3, 31 / 3, 230.0]], rtol=0, atol=1e-12)


def test_x_is_column_and_y_is_row():
    out = extract_peaks(single(4, 25), refine="none")  # row 4, column 25
    np.testing.assert_allclose(out, [[lr(25), lr(4), 230.0]], rtol=0, atol=1e-12)
    assert out[0, 0] == pytest.approx(8.0) and out[0, 1] == pytest.approx(1.0)


def test_symmetric_blob_centroid_is_the_centre():
    m = np.zeros((N, N))
    m[9:12, 19:22] = [[20, 50, 20], [50, 200, 50], [20, 50, 20]]  # centre cell (10, 20)
    out = extract_peaks(m, refine="centroid")
    np.testing.assert_allclose(out, [[lr(20), lr(10), 200.0]], rtol=0, atol=1e-12)
    assert out[0, 0] == pytest.approx(19 / 3) and out[0, 1] == pytest.approx(3.0)


def test_asymmetric_blob_centroid_hand_computed():
    m = np.zeros((N, N))
    m[10, 10] = 200.0  # the peak
    m[10, 11] = 100.0  # right
    m[11, 10] = 50.0  # down
    m[9, 9] = 30.0  # up-left
    m[9, 11] = -40.0  # negative output is clipped to 0: no pull
    m[10, 13] = 60.0  # outside the 3x3 neighbourhood, below threshold: ignored
    mass = 200.0 + 100.0 + 50.0 + 30.0
    dx = (100.0 - 30.0) / mass
    dy = (50.0 - 30.0) / mass
    out = extract_peaks(m, refine="centroid")
    assert out.shape == (1, 3)
    np.testing.assert_allclose(out[0], [lr(10 + dx), lr(10 + dy), 200.0], rtol=0, atol=1e-12)
    # Written out: x = (10 + 70/380 + 0.5)/3 - 0.5
    assert out[0, 0] == pytest.approx((10 + 70 / 380 + 0.5) / 3 - 0.5, abs=1e-12)
    assert out[0, 1] == pytest.approx((10 + 20 / 380 + 0.5) / 3 - 0.5, abs=1e-12)


def test_centroid_cut_at_the_border():
    m = np.zeros((N, N))
    m[0, 0], m[0, 1], m[1, 0], m[1, 1] = 200.0, 100.0, 50.0, 50.0
    out = extract_peaks(m, refine="centroid")
    # mass 400; dx = (100 + 50) / 400, dy = (50 + 50) / 400; off-map cells contribute nothing
    np.testing.assert_allclose(out, [[lr(0.375), lr(0.25), 200.0]], rtol=0, atol=1e-12)


def test_centroid_offset_stays_within_one_cell():
    rng = np.random.default_rng(3)
    m = rng.uniform(-50, 255, (N, N))
    cells = extract_peaks(m, refine="none")
    cent = extract_peaks(m, refine="centroid")
    np.testing.assert_array_equal(cells[:, 2], cent[:, 2])
    assert np.all(np.abs(cent[:, :2] - cells[:, :2]) <= 1 / 3 + 1e-12)


def test_quadratic_recovers_the_vertex_of_a_sampled_paraboloid():
    i0, j0 = 12.3, 20.6  # vertex (row, column) in HR cell units
    i, j = np.mgrid[0:N, 0:N].astype(float)
    m = 240.0 - 3.0 * (i - i0) ** 2 - 5.0 * (j - j0) ** 2  # concave: one maximum, cell (12, 21)
    out = extract_peaks(m, refine="quadratic")
    assert out.shape == (1, 3)
    expected_value = 240.0 - 3.0 * 0.3**2 - 5.0 * 0.4**2
    np.testing.assert_allclose(out[0], [lr(j0), lr(i0), expected_value], rtol=0, atol=1e-9)
    # The cell centre and the centroid are both wrong here: the refinement matters.
    assert abs(extract_peaks(m, refine="none")[0, 0] - lr(j0)) > 0.1


def test_quadratic_separable_axes_hand_computed():
    m = np.zeros((N, N))
    m[20, 5] = 200.0
    m[20, 4], m[20, 6] = 100.0, 150.0  # left, right
    m[19, 5], m[21, 5] = 120.0, 80.0  # up, down
    dx = (100.0 - 150.0) / (2 * (100.0 - 400.0 + 150.0))  # = 1/6
    dy = (120.0 - 80.0) / (2 * (120.0 - 400.0 + 80.0))  # = -0.1
    out = extract_peaks(m, refine="quadratic")
    np.testing.assert_allclose(out, [[lr(5 + dx), lr(20 + dy), 200.0]], rtol=0, atol=1e-12)
    assert dx == pytest.approx(1 / 6) and dy == pytest.approx(-0.1)


def test_quadratic_falls_back_to_the_centre_at_the_border():
    m = np.zeros((N, N))
    m[0, 10] = 200.0  # top row: no neighbour above, so no fit along y
    m[0, 9], m[0, 11] = 100.0, 150.0
    m[1, 10] = 150.0
    dx = (100.0 - 150.0) / (2 * (100.0 - 400.0 + 150.0))
    out = extract_peaks(m, refine="quadratic")
    np.testing.assert_allclose(out, [[lr(10 + dx), lr(0), 200.0]], rtol=0, atol=1e-12)


def test_whole_map_plateau():
    m = np.full((N, N), 100.0)  # one plateau: its first cell (0, 0) is the one peak
    np.testing.assert_allclose(extract_peaks(m, refine="none"), [[lr(0), lr(0), 100.0]])
    # quadratic: no fit at the border (and a flat one inside): the cell centre
    out = extract_peaks(m, refine="quadratic")
    np.testing.assert_allclose(out, [[lr(0), lr(0), 100.0]], rtol=0, atol=1e-12)
    # centroid over the 2x2 in-map part of the neighbourhood: half a cell down and right
    out = extract_peaks(m, refine="centroid")
    np.testing.assert_allclose(out, [[lr(0.5), lr(0.5), 100.0]], rtol=0, atol=1e-12)


def test_quadratic_two_cell_plateau_gives_half_a_cell():
    m = np.zeros((N, N))
    m[8, 8] = m[8, 9] = 200.0
    out = extract_peaks(m, refine="quadratic")
    np.testing.assert_allclose(out, [[lr(8.5), lr(8), 200.0]], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Threshold, plateaus, NMS, max_targets, ordering


def test_threshold_is_strict():
    m = np.zeros((N, N))
    m[5, 5], m[15, 15], m[25, 25] = 70.0, 70.5, 69.0
    out = extract_peaks(m, refine="none")
    np.testing.assert_allclose(out, [[lr(15), lr(15), 70.5]])
    assert extract_peaks(m, threshold=70.5).shape == (0, 3)
    assert extract_peaks(m, threshold=60.0).shape == (3, 3)


@pytest.mark.parametrize("nms_radius", [0, 1, 2])
def test_adjacent_equal_maxima_give_one_peak(nms_radius):
    for second in [(10, 11), (11, 10), (11, 11), (11, 9)]:
        m = np.zeros((N, N))
        m[10, 10] = m[second] = 200.0
        out = extract_peaks(m, refine="none", nms_radius=nms_radius)
        # first in row-major order: (10, 10) before any of the second cells
        np.testing.assert_allclose(out, [[lr(10), lr(10), 200.0]])


def test_plateau_centroid_moves_half_a_cell_towards_the_twin():
    m = np.zeros((N, N))
    m[10, 10] = m[10, 11] = 200.0
    out = extract_peaks(m, refine="centroid")
    np.testing.assert_allclose(out, [[lr(10.5), lr(10), 200.0]], rtol=0, atol=1e-12)


def test_snaking_plateau_gives_one_peak():
    # (5, 5), (6, 6), (5, 7): one 8-connected plateau; (5, 7) has no equal neighbour before
    # it in row-major order, so a purely local rule would report it too.
    m = np.zeros((N, N))
    m[4:8, 4:9] = 50.0
    m[5, 5] = m[6, 6] = m[5, 7] = 200.0
    out = extract_peaks(m, refine="none", nms_radius=0)
    np.testing.assert_allclose(out, [[lr(5), lr(5), 200.0]])


def test_shoulder_is_not_a_peak():
    # (10, 10) is >= all its neighbours, but its plateau {(10, 10), (10, 11)} touches 150.
    m = np.zeros((N, N))
    m[10, 10] = m[10, 11] = 100.0
    m[10, 12] = 150.0
    out = extract_peaks(m, refine="none")
    np.testing.assert_allclose(out, [[lr(12), lr(10), 150.0]])


def test_nms_radius_two_cells_apart():
    m = np.zeros((N, N))
    m[10, 10], m[10, 12] = 200.0, 180.0
    m[20, 20], m[22, 22] = 190.0, 170.0  # diagonal: Chebyshev distance 2 as well
    for radius in (0, 1):
        out = extract_peaks(m, refine="none", nms_radius=radius)
        np.testing.assert_allclose(out[:, 2], [200.0, 190.0, 180.0, 170.0])
    out = extract_peaks(m, refine="none", nms_radius=2)
    np.testing.assert_allclose(out, [[lr(10), lr(10), 200.0], [lr(20), lr(20), 190.0]])


def test_nms_is_greedy_against_accepted_peaks_only():
    m = np.zeros((N, N))
    m[10, 10], m[10, 13], m[10, 16] = 200.0, 190.0, 180.0
    out = extract_peaks(m, refine="none", nms_radius=3)
    # 190 is within 3 of 200 and dropped; 180 is 3 from the dropped 190 only: kept.
    np.testing.assert_allclose(out, [[lr(10), lr(10), 200.0], [lr(16), lr(10), 180.0]])
    out = extract_peaks(m, refine="none", nms_radius=6)
    np.testing.assert_allclose(out, [[lr(10), lr(10), 200.0]])


def test_nms_near_the_border():
    m = np.zeros((N, N))
    m[0, 0], m[0, 3], m[32, 32], m[30, 32] = 200.0, 190.0, 180.0, 170.0
    out = extract_peaks(m, refine="none", nms_radius=3)
    np.testing.assert_allclose(out, [[lr(0), lr(0), 200.0], [lr(32), lr(32), 180.0]])


def test_max_targets_keeps_the_brightest():
    m = np.zeros((N, N))
    values = {(3, 3): 100.0, (10, 20): 250.0, (20, 10): 180.0, (30, 30): 220.0, (15, 15): 90.0}
    for cell, value in values.items():
        m[cell] = value
    out = extract_peaks(m, refine="none", max_targets=2)
    np.testing.assert_allclose(out, [[lr(20), lr(10), 250.0], [lr(30), lr(30), 220.0]])
    assert extract_peaks(m, max_targets=0).shape == (0, 3)
    assert extract_peaks(m, max_targets=50).shape == (5, 3)
    # with NMS the cap applies after suppression
    m[10, 22] = 240.0  # 2 cells from the 250
    out = extract_peaks(m, refine="none", max_targets=2, nms_radius=2)
    np.testing.assert_allclose(out[:, 2], [250.0, 220.0])


def test_sorted_by_brightness_descending():
    rng = np.random.default_rng(7)
    m = np.zeros((N, N))
    cells = [(r, c) for r in range(1, N, 4) for c in range(1, N, 4)]
    values = rng.permutation(np.linspace(80, 250, len(cells)))
    for cell, value in zip(cells, values):
        m[cell] = value
    out = extract_peaks(m, refine="none")
    assert out.shape == (len(cells), 3)
    np.testing.assert_array_equal(out[:, 2], np.sort(values)[::-1])
    for x, y, value in out:  # each row carries its own cell's position
        assert m[int(round(3 * y + 1)), int(round(3 * x + 1))] == value


def test_equal_brightness_ties_keep_row_major_order():
    m = np.zeros((N, N))
    m[20, 5] = m[5, 20] = m[5, 5] = 200.0
    out = extract_peaks(m, refine="none")
    np.testing.assert_allclose(out[:, :2], [[lr(5), lr(5)], [lr(20), lr(5)], [lr(5), lr(20)]])


@pytest.mark.parametrize("refine", REFINE_MODES)
def test_border_peaks_on_every_edge(refine):
    m = np.zeros((N, N))
    m[0, 16], m[32, 10], m[16, 0], m[10, 32] = 250.0, 240.0, 230.0, 220.0
    out = extract_peaks(m, refine=refine)
    expected = [[lr(16), lr(0), 250], [lr(10), lr(32), 240], [lr(0), lr(16), 230], [lr(32), lr(10), 220]]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("refine", REFINE_MODES)
def test_empty_results(refine):
    for m in (np.zeros((N, N)), np.full((N, N), 70.0), np.zeros((0, 0)), np.zeros((0, 5))):
        out = extract_peaks(m, refine=refine)
        assert out.shape == (0, 3) and out.dtype == np.float64


def test_negative_threshold_and_non_positive_peaks():
    m = np.full((5, 5), -10.0)
    m[2, 2] = -1.0
    for refine in REFINE_MODES:
        out = extract_peaks(m, threshold=-5.0, refine=refine)
        np.testing.assert_allclose(out, [[lr(2), lr(2), -1.0]])


def test_ratio_changes_only_the_coordinate_mapping():
    m = single(7, 4, 200.0, n=22)
    out = extract_peaks(m, refine="none", ratio=2)
    np.testing.assert_allclose(out, [[hr_to_lr(4, 2), hr_to_lr(7, 2), 200.0]])
    np.testing.assert_allclose(extract_peaks(m, refine="none", ratio=1), [[4.0, 7.0, 200.0]])


def test_accepts_other_dtypes_and_leaves_input_alone():
    m = np.zeros((N, N), dtype=np.float32)
    m[10, 10], m[10, 11] = 230.0, 115.0
    before = m.copy()
    out = extract_peaks(m)
    np.testing.assert_array_equal(m, before)
    np.testing.assert_allclose(out, [[lr(10 + 115 / 345), lr(10), 230.0]], atol=1e-12)
    out8 = extract_peaks(m.astype(np.uint8))
    np.testing.assert_allclose(out8, out, atol=1e-12)
    np.testing.assert_allclose(extract_peaks(m.tolist()), out, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Round trip with the physics module's HR ground-truth map


@pytest.mark.parametrize("refine", REFINE_MODES)
def test_round_trip_targets_at_cell_centres(refine):
    cells = [(5, 7), (16, 17), (27, 24)]  # (row, column), far apart
    brightness = [225.0, 248.0, 236.0]
    targets = np.array([[lr(j), lr(i), a] for (i, j), a in zip(cells, brightness)])
    m = hr_map(targets)
    assert np.count_nonzero(m) == 3
    out = extract_peaks(m, refine=refine)
    expected = targets[np.argsort(-targets[:, 2])]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "bad",
    [np.zeros(33), np.zeros((2, 33, 33)), np.float64(3.0), [[1.0, np.nan]], [[np.inf, 0.0]], [["a", "b"]]],
)
def test_bad_map_raises(bad):
    with pytest.raises(ValueError):
        extract_peaks(bad)


def test_unknown_refine_names_the_allowed_values():
    with pytest.raises(ValueError) as err:
        extract_peaks(single(3, 3), refine="gaussian")
    for mode in REFINE_MODES:
        assert mode in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": float("nan")},
        {"threshold": "high"},
        {"nms_radius": -1},
        {"nms_radius": 1.5},
        {"max_targets": -1},
        {"max_targets": 2.5},
        {"ratio": 0},
    ],
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        extract_peaks(single(3, 3), **kwargs)
    with pytest.raises(ValueError):
        extract_peaks_batch(single(3, 3)[None], **kwargs)


def test_batch_needs_three_dimensions():
    with pytest.raises(ValueError):
        extract_peaks_batch(np.zeros((N, N)))
    with pytest.raises(ValueError):
        extract_peaks_batch(np.full((2, N, N), np.nan))


# ---------------------------------------------------------------------------------------------
# Batch, and agreement with a slow reference


def random_maps(rng, count: int, shape=(N, N)) -> np.ndarray:
    """A mix: sparse blobs on noise (like network output), dense noise, coarse ties."""
    maps = []
    for k in range(count):
        kind = k % 3
        if kind == 0:
            m = rng.normal(0, 3, shape)
            for _ in range(rng.integers(0, 5)):
                i, j = rng.integers(0, shape[0]), rng.integers(0, shape[1])
                m[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2] += rng.uniform(20, 80)
                m[i, j] += rng.uniform(150, 200)
        elif kind == 1:
            m = rng.uniform(0, 255, shape)
        else:
            m = rng.integers(0, 4, shape) * 60.0  # many plateaus and shoulders
        maps.append(m)
    return np.stack(maps)


@pytest.mark.parametrize("refine", REFINE_MODES)
@pytest.mark.parametrize(("nms_radius", "max_targets"), [(1, None), (2, 3), (0, 1), (3, None)])
def test_batch_equals_per_map(refine, nms_radius, max_targets):
    rng = np.random.default_rng(11)
    maps = random_maps(rng, 24)
    kwargs = dict(refine=refine, nms_radius=nms_radius, max_targets=max_targets)
    batch = extract_peaks_batch(maps, **kwargs)
    assert isinstance(batch, list) and len(batch) == len(maps)
    for m, got in zip(maps, batch):
        want = extract_peaks(m, **kwargs)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert sum(len(b) for b in batch) > (100 if max_targets is None else 15)  # there were peaks


def test_batch_edge_cases():
    assert extract_peaks_batch(np.zeros((0, N, N))) == []
    out = extract_peaks_batch(np.zeros((3, N, N)))
    assert len(out) == 3 and all(o.shape == (0, 3) for o in out)
    one = extract_peaks_batch(single(16, 16)[None], refine="none")
    assert len(one) == 1
    np.testing.assert_allclose(one[0], [[5.0, 5.0, 230.0]])


def reference_peaks(m: np.ndarray, threshold: float, nms_radius: int) -> list[tuple]:
    """Slow, literal implementation of the peak rule: cells (i, j, value), sorted."""
    h, w = m.shape

    def neighbours(i, j):
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if (di or dj) and 0 <= i + di < h and 0 <= j + dj < w:
                    yield i + di, j + dj

    seen = np.zeros(m.shape, dtype=bool)
    found = []
    for i in range(h):
        for j in range(w):  # row-major: the first cell reached is the plateau's first cell
            if seen[i, j] or m[i, j] <= threshold:
                continue
            plateau, queue = [], deque([(i, j)])
            seen[i, j] = True
            while queue:
                cell = queue.popleft()
                plateau.append(cell)
                for nb in neighbours(*cell):
                    if not seen[nb] and m[nb] == m[i, j]:
                        seen[nb] = True
                        queue.append(nb)
            if all(m[nb] <= m[i, j] for cell in plateau for nb in neighbours(*cell)):
                found.append((i, j, m[i, j]))
    found.sort(key=lambda c: -c[2])  # stable: ties stay row-major
    accepted = []
    for i, j, v in found:
        if all(max(abs(i - a), abs(j - b)) > nms_radius for a, b, _ in accepted):
            accepted.append((i, j, v))
    return accepted


@pytest.mark.parametrize("nms_radius", [0, 1, 2, 4])
def test_matches_slow_reference(nms_radius):
    rng = np.random.default_rng(5)
    maps = random_maps(rng, 18, shape=(14, 17))
    total = 0
    for m in maps:
        expected = reference_peaks(m, 70.0, nms_radius)
        got = extract_peaks(m, refine="none", nms_radius=nms_radius, ratio=1)
        want = np.array([[j, i, v] for i, j, v in expected]).reshape(-1, 3)
        np.testing.assert_array_equal(got, want)
        total += len(expected)
    assert total > 50


# ---------------------------------------------------------------------------------------------
# Speed: the service runs this on every window


def test_speed_single_maps():
    rng = np.random.default_rng(2)
    maps = random_maps(rng, 200)
    extract_peaks(maps[0])  # warm-up
    start = time.perf_counter()
    for m in maps:
        extract_peaks(m, refine="centroid")
    mean = (time.perf_counter() - start) / len(maps)
    assert mean < 1e-3, f"mean {mean * 1e6:.0f} us per 33x33 map"


def test_speed_batch():
    rng = np.random.default_rng(4)
    maps = random_maps(rng, 200)
    extract_peaks_batch(maps[:2])  # warm-up
    start = time.perf_counter()
    extract_peaks_batch(maps, refine="centroid")
    mean = (time.perf_counter() - start) / len(maps)
    assert mean < 1e-3, f"mean {mean * 1e6:.0f} us per map in a batch of 200"


# ---------------------------------------------------------------------------------------------
# mode="cells": every cell above the threshold (the reference CSO-mAP rule)


def test_cells_mode_keeps_adjacent_targets():
    # two targets 0.3 px apart fall in neighbouring HR cells; local maxima would merge them
    m = np.zeros((N, N))
    m[16, 16], m[16, 17], m[17, 17] = 240.0, 225.0, 71.0
    m[15, 16] = 69.0  # below the threshold: no target, but it pulls the first centroid up
    out = peaks.extract_peaks(m, refine="none")
    np.testing.assert_allclose(out, [[5.0, 5.0, 240.0], [lr(17), 5.0, 225.0], [lr(17), lr(17), 71.0]], atol=1e-12)
    assert len(extract_peaks(m, refine="none")) == 1
    cen = peaks.extract_peaks(m, refine="centroid")
    # neighbours that are targets get no weight: only the 69 above the 240 moves it
    np.testing.assert_allclose(cen[0], [5.0, lr(16 - 69.0 / (240.0 + 69.0)), 240.0], atol=1e-12)
    # the 225 sees the 69 diagonally (up-left) and ignores the 240 and the 71
    np.testing.assert_allclose(cen[1, :2], [lr(17 - 69.0 / 294.0), lr(16 - 69.0 / 294.0)], atol=1e-12)


def test_cells_mode_batch_and_bad_mode():
    rng = np.random.default_rng(5)
    maps = rng.uniform(0, 100, size=(4, N, N))
    batch = peaks.extract_peaks_batch(maps, refine="centroid")
    for m, got in zip(maps, batch):
        np.testing.assert_allclose(got, peaks.extract_peaks(m, refine="centroid"))
        assert len(got) == int((m > 70).sum())
    with pytest.raises(ValueError, match="mode"):
        peaks.extract_peaks(maps[0], mode="blobs")
