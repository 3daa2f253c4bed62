"""``csist bench speed --quick`` on the tiny model: every row measured, server runs real."""

from __future__ import annotations

import json

import pytest

from bench import cli, speed
from bench.flops import window_flops
from service.kernels import conv, deform
from training.model import DeRefNetConfig


def test_flops_count_by_hand():
    cfg = DeRefNetConfig(stages=1, channels=4, res_blocks=1).to_dict()
    f = window_flops(cfg)
    hw = 33 * 33
    stage = 2 * 2 * 121 * hw + 4 * hw + 2 * 9 * hw * (4 + 16 + 16 + 4) + 2 * 4 * hw
    assert f["encoder_per_frame"] == 4 * 121 * hw + stage
    assert f["uncached_per_window"] - f["streaming_per_window"] == 4 * f["encoder_per_frame"]
    full = window_flops(DeRefNetConfig().to_dict())
    assert 0.3e9 < full["encoder_per_frame"] < 0.4e9  # 9 stages of 32-channel 3x3 convs on 33x33


def test_quick_speed_report(tiny_model, tmp_path):
    out, md = tmp_path / "speed.json", tmp_path / "speed.md"
    rc = cli.main(
        [
            "speed",
            "--model",
            str(tiny_model),
            "--checkpoint",
            str(tiny_model.parent / "tiny.pt"),
            "--quick",
            "--windows",
            "32",
            "--tracks",
            "2",
            "--rate",
            "20",
            "--max-rate",
            "60",
            "--rest-rate",
            "10",
            "--seconds",
            "1",
            "--no-uncached-server",
            "--no-tuning",
            "--workers",
            "2",
            "--server-setting",
            "CSIST_MAX_BATCH_SIZE=16",
            "--server-setting",
            "CSIST_PLAN_BUDGET_S=0.5",
            "--server-setting",
            "CSIST_DEADLINE_MS=0",
            "--out",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    modes = {(r["mode"], r["batch"]) for r in report["rows"]}
    assert {
        ("ONNX single graph", 1),
        ("ONNX single graph", 8),
        ("ONNX single graph", 32),
        ("ONNX encoder+head, streaming (cached features)", 32),
        ("ONNX single graph, 2 workers x 1 thread", 32),
        ("ONNX encoder+head, streaming, 2 workers x 1 thread", 32),
    } <= modes
    assert any(m.startswith("PyTorch eager") for m, _ in modes)
    for r in report["rows"]:
        assert r["windows_per_s"] > 0 and 0 < r["roofline_fraction"]
    assert report["conv_throughput"]["ort_gflops"] > 0.1
    assert report["ratios"]["onnx_single_vs_eager_batch32"] > 0
    assert report["ratios"]["onnx_streaming_2_workers_vs_eager_batch32"] > 0
    settings = report["server"]["cached"]["settings"]
    assert settings["CSIST_INFERENCE_WORKERS"] == 2 and settings["CSIST_MAX_BATCH_SIZE"] == "16"
    s = report["server"]["cached"]
    for key in ("ws_fixed", "ws_saturation"):
        assert s[key]["ok"] and s[key]["answered"] > 0 and s[key]["missing"] == 0
        assert s[key]["p50_ms"] <= s[key]["p99_ms"]
    assert isinstance(s["ws_saturation"]["saturated"], bool)
    assert 0 < s["ready_s"] < 120 and "Start-up to ready" in md.read_text()
    assert s["rest"]["requests"] > 0 and s["rest"]["failures"] == 0
    # from the server's csist_model_info: the auto plan (4 channels, no amx_split), beside the stock plan
    assert s["plan"] == report["plans"]["name"] or s["plan"] in ("onnxruntime", "native-deform")
    stock = report["server"].get("stock plan", s)
    assert stock["ws_saturation"]["answered"] > 0 and report["ratios"]["server_plan_vs_stock_saturation"] > 0
    assert {r["plan"] for r in report["plans"]["candidates"]} >= {"onnxruntime", "amx", "cuda"}
    assert report["done_when"]["target_windows_per_s"] == 150
    text = md.read_text()
    assert "| ONNX single graph | 32 |" in text and "WebSocket, fixed rate (cached)" in text
    assert "Execution plans as the service chooses them" in text


def test_the_saturating_load_doubles_until_the_server_falls_behind():
    offered = []

    def server(capacity):
        def run(rate):
            offered.append(rate)
            return {"windows_per_s": min(rate, capacity), "offered_windows_per_s": rate}

        return run

    r = speed.saturate(server(700.0), 200.0, 3)
    assert offered == [200.0, 400.0, 800.0]
    assert r["saturated"] and r["windows_per_s"] == 700.0 and r["offered_windows_per_s"] == 800.0
    offered.clear()
    r = speed.saturate(server(1e6), 200.0, 2)
    assert offered == [200.0, 400.0, 800.0] and not r["saturated"]
    offered.clear()
    assert speed.saturate(server(50.0), 200.0, 3)["saturated"] and offered == [200.0]


def test_server_settings_parse():
    from bench.speed import server_settings

    assert server_settings(["max_batch_size=16", "CSIST_THREADS = 2"]) == {"max_batch_size": "16", "threads": "2"}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        server_settings(["max_batch_size"])


def test_ort_option_sweep(tiny_model):
    from bench.common import simulated_trajectories
    from bench.speed import ORT_VARIANTS, ort_tuning
    from training.data import windows

    traj, _ = simulated_trajectories(2, seed=1)
    names = list(ORT_VARIANTS)[:1] + ["arena off", "threads=1", "2 workers x threads=1"]
    out = ort_tuning(
        tiny_model, windows(traj)[:32], traj, 0.001, rounds=2, variants={k: ORT_VARIANTS[k] for k in names}
    )
    assert list(out) == names
    default, *others = out.values()
    assert default["keep"] is None and default["rounds"] == 2
    for e in others:
        assert set(e["keep"]) == {"single_batch32", "streaming_32_tracks", "streaming_1_track"}
        for key, kept in e["keep"].items():
            assert e[key] > 0 and kept == (e[key] > 1.05 * default[key])


def test_streaming_step_equals_the_single_graph(tiny_model):
    """The in-process streaming mode computes the same maps as the single graph."""
    import numpy as np

    from bench.common import simulated_trajectories
    from bench.speed import OrtModel

    traj, _ = simulated_trajectories(3, seed=2)
    m = OrtModel(tiny_model)
    cache = np.zeros((3, 5, 1089), dtype=np.float32)
    for t in range(7):
        maps = m.streaming_step(traj, cache, t)
    want = m.run_single(np.ascontiguousarray(traj[:, 2:7]))
    assert np.abs(maps - want).max() < 1e-3


@pytest.mark.skipif(not (conv.AMX and deform.AVAILABLE), reason=f"no AMX here: {conv.WHY_NOT_AMX}")
def test_streaming_step_with_the_amx_kernels(tmp_path_factory, tmp_path):
    """The AMX rows run the service's split parts: close to the single graph, not equal to it."""
    import shutil

    import numpy as np

    from bench.common import simulated_trajectories
    from bench.speed import OrtModel
    from tests.service.tiny_derefnet import tiny_model_path
    from training import split_amx

    src = tiny_model_path(tmp_path_factory, channels=32)
    model = tmp_path / src.name
    shutil.copytree(src, model)
    assert split_amx.main(["--model", str(model), "--parity-windows", "2"]) == 0
    traj, _ = simulated_trajectories(3, seed=2)
    m = OrtModel(model, {"threads": 1, "deform_kernel": "native", "conv_kernel": "amx"})
    assert m.loaded.conv_kernel == "amx"
    cache = np.zeros((3, 5, 1089), dtype=np.float32)
    for t in range(7):
        maps = m.streaming_step(traj, cache, t)
    want = m.run_single(np.ascontiguousarray(traj[:, 2:7]))
    assert 0 < np.abs(maps - want).max() < 2e-2 * np.abs(want).max()
    with pytest.raises(SystemExit, match="no amx_split"):
        OrtModel(src, {"conv_kernel": "amx"})


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit):
        cli.main(["nope"])


def test_option_sweep_skips_variants_whose_kernels_cannot_run(tiny_model):
    """The tiny model (4 channels) has no amx_split: its AMX variant is reported as skipped."""
    from bench.common import simulated_trajectories
    from bench.speed import ORT_VARIANTS, ort_tuning
    from training.data import windows

    traj, _ = simulated_trajectories(2, seed=1)
    names = list(ORT_VARIANTS)[:1] + ["2 workers x threads=1, AMX kernels"]
    out = ort_tuning(tiny_model, windows(traj)[:8], traj, 0.001, rounds=1, variants={k: ORT_VARIANTS[k] for k in names})
    assert "skipped" in out["2 workers x threads=1, AMX kernels"]
    assert out[names[0]]["single_batch32"] > 0
