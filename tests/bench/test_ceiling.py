"""``csist bench ceiling``: the information bound of each field condition, and its CSO-mAP."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import cli
from bench.ceiling import efficient_draws, window_velocity
from training.metric import cso_map


def test_the_window_velocity_is_the_groups():
    times = np.arange(-2.0, 3.0)
    start = np.array([[4.0, 5.0, 200.0], [5.0, 5.5, 210.0]])
    frames = [start + [0.05 * t, -0.02 * t, 0.0] for t in times]
    np.testing.assert_allclose(window_velocity(frames, times), [0.05, -0.02], atol=1e-12)


def test_efficient_draws_follow_the_bound():
    rng = np.random.default_rng(0)
    truth = [np.array([[5.0, 5.0, 240.0]])] * 4000
    bound = [np.array([[0.03, 0.06, 0.5]])] * 4000
    found = np.concatenate(efficient_draws(truth, bound, rng))
    err = found[:, :2] - 5.0
    assert err.std(axis=0) == pytest.approx([0.03, 0.06], rel=0.05)
    assert np.corrcoef(err.T)[0, 1] == pytest.approx(0.5, abs=0.05)
    np.testing.assert_array_equal(found[:, 2], 240.0)  # scored by the true brightness
    # no information: the draws miss
    lost = efficient_draws(truth[:50], [np.array([[40.0, 40.0, 0.0]])] * 50, rng)
    assert cso_map(lost, truth[:50])["mAP"] < 5


def test_quick_ceiling_report(tmp_path):
    field = tmp_path / "field.json"
    row = {"condition": "2-8 targets", "trajectories": 3, "none": {"mAP": 30.0}, "fit": {"mAP": 60.0}}
    field.write_text(json.dumps({"rows": [row]}))
    out, md = tmp_path / "ceiling.json", tmp_path / "ceiling.md"
    names = ["protocol, clean", "2-8 targets"]
    args = ["ceiling", "--trajectories", "3", "--conditions", *names, "--field", str(field)]
    assert cli.main([*args, "--out", str(out), "--markdown", str(md)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["condition"] for r in rows] == names
    clean, many = rows
    assert clean["windows"] == many["windows"] == 3 * 16
    # clean 2-4 target crosses are resolved to hundredths of a pixel; 5-8 clipped targets are not
    assert clean["median_bound_px"] < 0.05 and clean["ceiling_mAP"] > 75
    assert many["median_bound_px"] > clean["median_bound_px"]
    assert "fit_mAP" not in clean and many["fit_mAP"] == 60.0
    assert "| 2-8 targets |" in md.read_text()
    with pytest.raises(SystemExit, match="--field"):
        cli.main(["ceiling", "--field", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="scored \\[3\\] trajectories"):
        cli.main(["ceiling", "--trajectories", "2", "--conditions", "2-8 targets", "--field", str(field)])


@pytest.mark.parametrize("command", ["speed", "accuracy", "field", "ceiling"])
def test_every_bench_command_has_help(command, capsys):
    # the conditions' names hold percent signs, which argparse's help formatting reads
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    assert "--out" in capsys.readouterr().out
