"""``csist bench accuracy --quick``: one table, every condition, the ceiling and the paper."""

from __future__ import annotations

import json

import numpy as np

from bench import cli
from bench.accuracy import CONDITIONS, cell_centre_detections
from bench.common import simulated_trajectories


def test_cell_centre_predictor_snaps_to_cells():
    truth = [np.array([[5.0, 5.0, 230.0], [5.2, 4.9, 240.0], [5.05, 5.1, 100.0]])]
    (found,) = cell_centre_detections(truth)
    # 5.0 and 5.05 share the cell centred at 5.0 (x) / (5.0, 5.1 -> 5.0 and 5.0): they merge
    rows = sorted(map(tuple, np.round(found, 4)))
    assert rows == [(5.0, 5.0, 330.0), (5.3333, 5.0, 240.0)]


def test_simulated_split_is_what_csist_simulate_writes(tmp_path):
    from training.data import read_split
    from training.simulate import main as simulate

    assert (
        simulate(
            [
                "--out",
                str(tmp_path),
                "--trajectories",
                "2",
                "--split",
                "0,0,1",
                "--seed",
                "7302",
                "--noise",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    split = read_split(tmp_path, "test", progress=False)
    frames, truth = simulated_trajectories(2, 7302, noise=2.0)
    np.testing.assert_array_equal(split.frames, frames)
    np.testing.assert_allclose(split.targets[1][3], truth[1][3], atol=1e-3)


def test_seeds_are_new_and_distinct():
    seeds = [c[2] for c in CONDITIONS.values()]
    assert len(set(seeds)) == len(seeds)
    assert not set(seeds) & {0, 1001, 3, 11, 20261121, 99, 777, 5, 4, 8101, 8301, 8302, 8305, 8306}


def test_quick_accuracy_report(tiny_model, tmp_path):
    out, md = tmp_path / "acc.json", tmp_path / "acc.md"
    rc = cli.main(
        [
            "accuracy",
            "--model",
            str(tiny_model),
            "--quick",
            "--refine",
            "none,centroid",
            "--conditions",
            "clean,sigma5,targets2-8",
            "--out",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert list(report["conditions"]) == ["clean", "sigma5", "targets2-8"]
    for name, c in report["conditions"].items():
        assert c["trajectories"] == 2 and c["frames_scored"] == 2 * 16
        assert c["paper"]["cso_map"] == CONDITIONS[name][3]
        ceiling = c["modes"]["perfect cell centres"]["mAP"]
        assert 30 < ceiling < 70  # about 50: the 1/3-px grid limits cell-centre answers
        for mode in ("none", "centroid"):
            assert 0 <= c["modes"][mode]["mAP"] <= 100
    assert report["conditions"]["sigma5"]["noise"] == 5.0
    text = md.read_text()
    assert "| clean (2-4 targets, sigma 0) | 7301 | 51.55 |" in text
    none = report["conditions"]["clean"]["modes"]["none"]
    assert f"{none['mAP']:.2f} ({none['count_accuracy']:.0f} %)" in text
    assert "49.79" in text and "47.23" in text
