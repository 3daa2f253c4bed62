"""scripts/refine_study.py: the fit study runs on the protocol's 2-8-target windows from exact anchors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "refine_study.py"


def _study():
    spec = importlib.util.spec_from_file_location("refine_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_truth_start_on_packed_windows_scores_its_own_answer_perfectly(capsys):
    study = _study()
    argv = ["--windows", "6", "--noise", "0", "--targets", "5-8", "--starts", "truth,cell", "--repeats", "1"]
    assert study.main(argv) == 0
    out = capsys.readouterr().out
    assert "5-8 targets" in out
    rows = {line.split("|")[0].split()[1]: line for line in out.splitlines() if line.strip().startswith("0 ")}
    assert set(rows) == {"truth", "cell"}
    truth_start, cell_start = (float(rows[k].split("|")[1].split()[0]) for k in ("truth", "cell"))
    assert truth_start == pytest.approx(100.0)
    assert cell_start < 100.0  # snapped to the 1/3-px grid


def test_simulated_windows_hold_the_requested_counts():
    study = _study()
    windows, truth = study.simulate_windows(8, 0.0, 5, study.SimParams(targets=(5, 8)))
    assert windows.shape == (8, 5, 11, 11)
    assert all(5 <= len(t) <= 8 for t in truth)


@pytest.mark.parametrize("text", ["1-4", "3-9", "x"])
def test_bad_target_counts_are_refused_naming_the_flag(text, capsys):
    with pytest.raises(SystemExit):
        _study().build_parser().parse_args(["--targets", text])
    assert "--targets" in capsys.readouterr().err
