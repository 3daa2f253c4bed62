"""Tests of the CSO-mAP metric (training/metric.py) against hand-worked values.

Offsets used for distances (0.0625, 0.125, 0.25) are exact in binary, so a "distance exactly
d" is exactly d in floating point too.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from training.metric import (
    THRESHOLDS,
    average_precision,
    count_accuracy,
    cso_map,
    localisation_error,
    match_frame,
    threshold_name,
)

KEYS = ["AP05", "AP10", "AP15", "AP20", "AP25"]


def assert_all(result: dict[str, float], value: float, tol: float = 1e-9) -> None:
    assert set(result) == set(KEYS) | {"mAP"}
    for key, got in result.items():
        assert got == pytest.approx(value, abs=tol), key


# --------------------------------------------------------------------------- average_precision


def test_average_precision_worked_example():
    # Ranked TP, TP, FP, FP, TP with 3 targets:
    #   precision 1, 1, 2/3, 1/2, 3/5;  recall 1/3, 2/3, 2/3, 2/3, 1
    #   monotone envelope from the right: 1, 1, 2/3, 3/5, 3/5
    #   recall steps: 0->1/3 at p=1, 1/3->2/3 at p=1, 2/3->1 at p=3/5
    #   AP = 1/3 + 1/3 + 1/3 * 3/5 = 13/15
    assert average_precision(np.array([1, 1, 0, 0, 1], bool), 3) == pytest.approx(13 / 15, abs=1e-9)


def test_average_precision_uses_the_monotone_envelope():
    # Ranked FP, TP, TP with 2 targets: precision 0, 1/2, 2/3; recall 0, 1/2, 1.
    # Envelope: 2/3 everywhere, so AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3.
    # (Raw precision at the steps would give 1/2 * 1/2 + 1/2 * 2/3 = 7/12.)
    assert average_precision(np.array([0, 1, 1], bool), 2) == pytest.approx(2 / 3, abs=1e-9)


def test_average_precision_missed_targets_cap_recall():
    # Ranked TP, FP with 4 targets: recall reaches only 1/4 at precision 1 -> AP = 1/4.
    assert average_precision(np.array([1, 0], bool), 4) == pytest.approx(0.25, abs=1e-9)


def test_average_precision_edge_cases():
    assert average_precision(np.array([], bool), 5) == 0.0  # nothing detected
    assert average_precision(np.array([0, 0], bool), 0) == 0.0  # no targets: 0 by convention
    assert average_precision(np.array([1, 1], bool), 2) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="true positives"):
        average_precision(np.array([1, 1, 1], bool), 2)
    with pytest.raises(ValueError, match="n_gt"):
        average_precision(np.array([], bool), -1)


# --------------------------------------------------------------------------- cso_map


def test_perfect_detections_give_100():
    gts = [[[1.0, 2.0, 10.0], [3.5, 4.25, 20.0]], [[5.0, 5.0, 7.0]], []]
    dets = [np.array(f) for f in gts]  # same positions, score = brightness
    assert_all(cso_map(dets, gts), 100.0)


def test_no_detections_give_0():
    gts = [[[1.0, 2.0, 10.0]], [[5.0, 5.0, 7.0], [6.0, 6.0, 1.0]]]
    assert_all(cso_map([[], np.zeros((0, 3))], gts), 0.0)


def test_no_ground_truth_at_all_gives_0():
    assert_all(cso_map([[[1.0, 1.0, 5.0]], []], [[], np.zeros((0, 3))]), 0.0)
    assert_all(cso_map([], []), 0.0)


def test_worked_example_with_threshold_dependence():
    # Frame 0 targets A(1,1), B(5,5); frame 1 target C(3,3): 3 targets.
    gts = [[[1, 1, 9], [5, 5, 9]], [[3, 3, 9]]]
    dets = [
        [[1, 1, 0.9], [8, 8, 0.7], [5.125, 5, 0.5]],  # A exact; far FP; B off by 0.125
        [[3, 3, 0.8], [6, 0, 0.6]],  # C exact; far FP
    ]
    # Ranking: 0.9 A, 0.8 C, 0.7 FP, 0.6 FP, 0.5 B.
    # d = 0.05, 0.10 (0.125 > d): TP TP FP FP FP -> precision 1, 1, 2/3, 1/2, 2/5,
    #   recall 1/3, 2/3, 2/3, 2/3, 2/3 -> AP = 1/3 + 1/3 = 2/3.
    # d = 0.15, 0.20, 0.25: TP TP FP FP TP -> AP = 13/15 (see the average_precision test).
    # mAP = (2 * 2/3 + 3 * 13/15) / 5 = (20/15 + 39/15) / 5 = 59/75.
    r = cso_map(dets, gts)
    assert r["AP05"] == pytest.approx(100 * 2 / 3, abs=1e-9)
    assert r["AP10"] == pytest.approx(100 * 2 / 3, abs=1e-9)
    for key in ("AP15", "AP20", "AP25"):
        assert r[key] == pytest.approx(100 * 13 / 15, abs=1e-9)
    assert r["mAP"] == pytest.approx(100 * 59 / 75, abs=1e-9)


def test_duplicate_detections_are_false_positives():
    # Frame 0: target (2,2) detected twice at the same spot; frame 1: target (4,4) once.
    gts = [[[2, 2, 5]], [[4, 4, 5]]]
    dets = [[[2, 2, 0.9], [2, 2, 0.8]], [[4, 4, 0.7]]]
    # Ranking TP, FP (duplicate), TP with 2 targets: precision 1, 1/2, 2/3; recall 1/2, 1/2, 1.
    # Envelope 1, 2/3, 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6 (100 without the duplicate).
    assert_all(cso_map(dets, gts), 100 * 5 / 6)
    assert_all(cso_map([[[2, 2, 0.9]], [[4, 4, 0.7]]], gts), 100.0)


def test_greedy_order_is_by_score_not_by_distance():
    # The higher-scored but farther detection takes the target; the exact one is then an FP.
    tp, matched = match_frame([[2.125, 2, 0.9], [2, 2, 0.8]], [[2, 2, 5]], 0.25)
    np.testing.assert_array_equal(tp, [True, False])
    np.testing.assert_array_equal(matched, [0, -1])
    # Results are in input row order, whatever the score order.
    tp, matched = match_frame([[2, 2, 0.8], [2.125, 2, 0.9]], [[2, 2, 5]], 0.25)
    np.testing.assert_array_equal(tp, [False, True])
    np.testing.assert_array_equal(matched, [-1, 0])


def test_nearest_target_taken_means_false_positive_even_if_another_is_within_d():
    # Targets A(0,0) and B(0.25,0). The second detection (0.0625,0) has nearest target A
    # (0.0625 away), already taken by the first, so it is an FP although B is 0.1875 away.
    gts = [[0, 0, 5], [0.25, 0, 5]]
    dets = [[0, 0, 0.9], [0.0625, 0, 0.8]]
    tp, matched = match_frame(dets, gts, 0.25)
    np.testing.assert_array_equal(tp, [True, False])
    np.testing.assert_array_equal(matched, [0, -1])
    # Ranking TP, FP with 2 targets: precision 1, 1/2; recall 1/2, 1/2 -> AP = 1/2.
    r = cso_map([dets], [gts], thresholds=(0.25,))
    assert r == pytest.approx({"AP25": 50.0, "mAP": 50.0}, abs=1e-9)


def test_match_frame_picks_the_nearest_target():
    gts = [[0, 0, 1], [1, 0, 1], [0.5, 0.5, 1]]
    tp, matched = match_frame([[0.9375, 0, 1.0], [0.5, 0.4375, 0.5]], gts, 0.25)
    np.testing.assert_array_equal(tp, [True, True])
    np.testing.assert_array_equal(matched, [1, 2])
    tp, matched = match_frame([], gts, 0.25)
    assert tp.shape == (0,) and matched.shape == (0,)
    tp, matched = match_frame([[0, 0, 1.0]], [], 0.25)
    np.testing.assert_array_equal(tp, [False])
    np.testing.assert_array_equal(matched, [-1])


def test_distance_exactly_d_is_a_true_positive():
    gts = [[[1, 1, 5]], [[3, 3, 5]]]
    dets = [[[1.25, 1, 0.9]], [[3, 2.75, 0.8]]]  # both exactly 0.25 away
    r = cso_map(dets, gts)
    assert r["AP25"] == pytest.approx(100.0, abs=1e-9)
    for key in ("AP05", "AP10", "AP15", "AP20"):
        assert r[key] == 0.0
    assert r["mAP"] == pytest.approx(20.0, abs=1e-9)
    # Just beyond d is an FP.
    tp, _ = match_frame([[1.25, 1, 0.9]], [[1, 1, 5]], 0.25)
    assert tp.tolist() == [True]
    tp, _ = match_frame([[1.25 + 2.0**-20, 1, 0.9]], [[1, 1, 5]], 0.25)
    assert tp.tolist() == [False]


def test_ranking_runs_over_all_frames():
    # Frame 0: target (1,1), exact detection with score 0.5 (TP).
    # Frame 1: target (3,3), detection far away with score 0.9 (FP).
    # Global ranking FP, TP with 2 targets: precision 0, 1/2; recall 0, 1/2;
    #   envelope 1/2 -> AP = 1/2 * 1/2 = 1/4.
    # (Ranking frame by frame, TP then FP, would give 1/2.)
    gts = [[[1, 1, 5]], [[3, 3, 5]]]
    dets = [[[1, 1, 0.5]], [[7, 7, 0.9]]]
    assert_all(cso_map(dets, gts), 25.0)


def test_score_ties_keep_frame_order():
    # Equal scores: the stable sort keeps frame order.
    fp_frame = ([[6, 6, 0.5]], [[1, 1, 5]])  # detection far from its target
    tp_frame = ([[3, 3, 0.5]], [[3, 3, 5]])
    # FP first: ranked FP, TP -> AP = 1/4 (as above); TP first: TP, FP -> AP = 1/2.
    r = cso_map([fp_frame[0], tp_frame[0]], [fp_frame[1], tp_frame[1]])
    assert_all(r, 25.0)
    r = cso_map([tp_frame[0], fp_frame[0]], [tp_frame[1], fp_frame[1]])
    assert_all(r, 50.0)


def test_empty_frames_on_either_side():
    gts = [[[1, 1, 5]], [[3, 3, 5]], [], np.zeros((0, 3))]
    dets = [[[1, 1, 0.5]], np.zeros((0, 3)), [[5, 5, 0.9]], []]
    # Frame 1: a missed target; frame 2: a detection with no target (FP); frame 3: nothing.
    # Ranked FP (0.9), TP (0.5) with 2 targets -> AP = 1/4.
    assert_all(cso_map(dets, gts), 25.0)


def test_custom_thresholds_and_names():
    assert threshold_name(0.05) == "AP05"
    assert threshold_name(0.25) == "AP25"
    assert threshold_name(0.5) == "AP50"
    assert [threshold_name(d) for d in THRESHOLDS] == KEYS
    r = cso_map([[[1.125, 1, 1.0]]], [[[1, 1, 5]]], thresholds=(0.1, 0.5))
    assert r == pytest.approx({"AP10": 0.0, "AP50": 100.0, "mAP": 50.0}, abs=1e-9)


def test_input_validation():
    with pytest.raises(ValueError, match=r"detections has 2 frames, ground_truth has 3"):
        cso_map([[], []], [[], [], []])
    with pytest.raises(ValueError, match=r"detections\[1\] must have shape \(N, 3\)"):
        cso_map([[], [[1.0, 2.0]]], [[], []])
    with pytest.raises(ValueError, match=r"ground_truth\[0\] must have shape \(N, 3\)"):
        cso_map([[]], [[1.0, 2.0, 3.0]])  # a bare row, not a list of rows
    with pytest.raises(ValueError, match=r"detections\[0\]"):
        cso_map([[[1.0, 2.0, 3.0], [1.0, 2.0]]], [[]])  # ragged rows
    with pytest.raises(ValueError, match="non-finite"):
        cso_map([[[1.0, 2.0, np.nan]]], [[[1.0, 2.0, 3.0]]])
    with pytest.raises(ValueError, match="threshold"):
        cso_map([[]], [[]], thresholds=(-0.1,))
    with pytest.raises(ValueError, match="duplicate"):
        cso_map([[]], [[]], thresholds=(0.05, 0.051))
    with pytest.raises(ValueError, match="at least one"):
        cso_map([[]], [[]], thresholds=())
    with pytest.raises(ValueError, match="3 frames"):
        count_accuracy([[], [], []], [[]])
    with pytest.raises(ValueError, match="1 frames"):
        localisation_error([[]], [[], []])
    with pytest.raises(ValueError, match=r"dets must have shape"):
        match_frame([[1.0, 2.0]], [], 0.25)


# --------------------------------------------------------------------------- diagnostics


def test_count_accuracy():
    gts = [[[1, 1, 5]], [[3, 3, 5], [4, 4, 5]], [], [[0, 0, 1]]]
    dets = [[[9, 9, 1]], [[3, 3, 1]], [], [[0, 0, 1]]]  # counts 1/1, 1/2, 0/0, 1/1 -> 3 of 4
    assert count_accuracy(dets, gts) == pytest.approx(0.75)
    assert math.isnan(count_accuracy([], []))


def test_localisation_error():
    gts = [[[1, 1, 5]], [[3, 3, 5]], [[6, 6, 5]]]
    dets = [[[1, 1, 0.9]], [[3.125, 3, 0.8]], [[6, 6.25, 0.7], [6, 6, 0.1]]]
    # d = 0.25: pairs at 0, 0.125, 0.25 (the 0.1 duplicate is an FP) -> mean 0.125.
    assert localisation_error(dets, gts) == pytest.approx(0.125, abs=1e-12)
    # d = 0.125: the 0.25 detection is an FP, so the exact 0.1 one matches: 0, 0.125, 0.
    assert localisation_error(dets, gts, d=0.125) == pytest.approx(0.125 / 3, abs=1e-12)
    assert math.isnan(localisation_error([[[9, 9, 1]]], gts[:1]))
    assert math.isnan(localisation_error([], []))


# --------------------------------------------------------------------------- against a reference


def _reference_cso_map(dets, gts, thresholds):
    """docs/method.md section 6 as plain loops, to cross-check the vectorised code."""
    ranked = sorted(
        ((f, k) for f, frame in enumerate(dets) for k in range(len(frame))),
        key=lambda fk: -dets[fk[0]][fk[1]][2],  # sorted() is stable
    )
    n_gt = sum(len(g) for g in gts)
    out = {}
    for d in thresholds:
        taken = [set() for _ in gts]
        tps = []
        for f, k in ranked:
            x, y, _ = dets[f][k]
            best, best_dist = -1, math.inf
            for j, (gx, gy, _) in enumerate(gts[f]):
                dist = math.hypot(x - gx, y - gy)
                if dist < best_dist:
                    best, best_dist = j, dist
            hit = best >= 0 and best_dist <= d and best not in taken[f]
            if hit:
                taken[f].add(best)
            tps.append(hit)
        # AP by definition: precision envelope at each recall step.
        if n_gt == 0 or not tps:
            out[threshold_name(d)] = 0.0
            continue
        prec, rec, n_tp = [], [], 0
        for i, hit in enumerate(tps, 1):
            n_tp += hit
            prec.append(n_tp / i)
            rec.append(n_tp / n_gt)
        ap, prev_rec = 0.0, 0.0
        for i in range(len(tps)):
            if rec[i] != prev_rec:
                ap += (rec[i] - prev_rec) * max(prec[i:])
                prev_rec = rec[i]
        out[threshold_name(d)] = 100 * ap
    out["mAP"] = sum(out.values()) / len(thresholds)
    return out


def _random_frames(rng, n_frames):
    dets, gts = [], []
    for _ in range(n_frames):
        n_gt = rng.integers(0, 4)
        gt = np.column_stack([rng.uniform(0, 2, (n_gt, 2)), rng.uniform(1, 5, n_gt)])
        n_det = rng.integers(0, 5)
        # Detections near random targets (some duplicates) plus some clutter.
        if n_gt:
            near = gt[rng.integers(0, n_gt, n_det), :2] + rng.normal(0, 0.12, (n_det, 2))
        else:
            near = rng.uniform(0, 2, (n_det, 2))
        scores = np.round(rng.uniform(0, 1, n_det), 1)  # coarse, so ties are common
        dets.append(np.column_stack([near, scores]))
        gts.append(gt)
    return dets, gts


def test_matches_a_plain_loop_reference_on_random_data():
    rng = np.random.default_rng(7)
    for _ in range(5):
        dets, gts = _random_frames(rng, 200)
        got = cso_map(dets, gts)
        want = _reference_cso_map([d.tolist() for d in dets], [g.tolist() for g in gts], THRESHOLDS)
        assert got == pytest.approx(want, abs=1e-9)
        assert 0 < got["AP05"] < got["AP25"] < 100  # the data exercise both TPs and FPs


def test_fast_on_a_full_test_set():
    rng = np.random.default_rng(0)
    n = 12_000
    gts = [np.column_stack([rng.uniform(0, 10, (3, 2)), rng.uniform(1, 5, 3)]) for _ in range(n)]
    dets = [np.column_stack([g[:, :2] + rng.normal(0, 0.1, (3, 2)), rng.uniform(0, 1, 3)]) for g in gts]
    start = time.perf_counter()
    r = cso_map(dets, gts)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.5, f"cso_map took {elapsed:.2f} s for 5 thresholds on {n} frames"
    assert 0 < r["mAP"] < 100
