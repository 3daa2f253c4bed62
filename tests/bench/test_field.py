"""``csist bench field`` on the tiny model: every condition simulates, runs and scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import cli
from bench.field import CONDITIONS, SEED_BASE, rotated, simulate
from training.metric import cso_map


def test_conditions_change_what_they_say():
    clean = simulate(*CONDITIONS["protocol, clean"], 2, SEED_BASE)
    flat = simulate(*CONDITIONS["flat background +30"], 2, SEED_BASE)
    ramp = simulate(*CONDITIONS["background ramp 10..60"], 2, SEED_BASE)
    many = simulate(*CONDITIONS["2-8 targets"], 6, SEED_BASE)
    assert clean.frames.shape == flat.frames.shape == (2, 20, 11, 11)
    assert clean.frames.min() == 0 and flat.frames.min() >= 29  # the pedestal lifts every pixel
    corners = ramp.frames[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.max() - corners.min() >= 30  # a ramp across the patch
    assert max(len(t[0]) for t in many.targets) > 4  # more than the protocol's 4
    assert np.array_equal(simulate(*CONDITIONS["flat background +30"], 2, SEED_BASE).frames, flat.frames)


def test_quick_field_report(tiny_model, tmp_path):
    out, md = tmp_path / "field.json", tmp_path / "field.md"
    names = ["protocol, clean", "flat background +30"]
    assert (
        cli.main(
            [
                "field",
                "--model",
                str(tiny_model),
                "--trajectories",
                "2",
                "--conditions",
                *names,
                "--out",
                str(out),
                "--markdown",
                str(md),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [r["condition"] for r in report["rows"]] == names
    for r in report["rows"]:
        assert r["windows"] == 2 * 16 and r["inference_ms_per_window"] > 0
        for refine in ("none", "fit"):
            assert 0 <= r[refine]["mAP"] <= 100 and r[refine]["postprocess_ms_per_window"] >= 0
            assert 0 <= r[refine]["rotated_mAP"] <= 100
    assert "| flat background +30 |" in md.read_text()
    # a condition scores the same trajectories whichever others run with it
    alone = tmp_path / "alone.json"
    args = ["field", "--model", str(tiny_model), "--trajectories", "2", "--conditions", names[1], "--out", str(alone)]
    assert cli.main(args) == 0
    row = json.loads(alone.read_text())["rows"][0]
    assert row["none"]["mAP"] == report["rows"][1]["none"]["mAP"]
    assert row["fit"]["mAP"] == report["rows"][1]["fit"]["mAP"]


def test_the_chance_column_turns_each_answer_about_its_group():
    truth = [np.array([[5.0, 5.0, 240.0], [5.3, 5.0, 230.0]]), np.array([[4.0, 6.0, 200.0]]), np.zeros((0, 3))]
    dets = [truth[0].copy(), np.array([[4.1, 6.0, 190.0]]), np.array([[5.0, 5.0, 100.0]])]
    turned = rotated(dets, truth, np.random.default_rng(0))
    # about the group's centre: the distances to it, the count and the scores stay
    centre = truth[0][:, :2].mean(axis=0)
    np.testing.assert_allclose(np.hypot(*(turned[0][:, :2] - centre).T), [0.15, 0.15])
    np.testing.assert_array_equal(turned[0][:, 2], dets[0][:, 2])
    assert not np.allclose(turned[0][:, :2], truth[0][:, :2])  # no longer on the targets
    # one target: turning about it keeps the answer's distance, and so its score
    assert np.hypot(*(turned[1][0, :2] - truth[1][0, :2])) == pytest.approx(0.1)
    np.testing.assert_array_equal(turned[2], dets[2])  # nothing to turn about
    assert cso_map(turned[1:2], truth[1:2])["mAP"] == cso_map(dets[1:2], truth[1:2])["mAP"]
