"""``csist quantize``: int8 files and card that the service loads, DeformConv kept in float."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from service.modelpkg.model import file_sha256, load_model
from tests.service.tiny_derefnet import tiny_model_path
from training import quantize


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_path(tmp_path_factory)


@pytest.fixture()
def model_dir(tiny_model, tmp_path):
    """A private copy of the tiny model (single graph, parts, card) to quantize next to."""
    for path in tiny_model.parent.glob("derefnet*"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def run(model_dir, *extra):
    out = model_dir / "derefnet-int8.onnx"
    argv = [
        "--model",
        str(model_dir / "derefnet.onnx"),
        "--out",
        str(out),
        "--calibration-trajectories",
        "3",
        "--parity-windows",
        "4",
        "--threads",
        "1",
        *extra,
    ]
    return quantize.main(argv), out


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_encoder_int8_card_loads_in_the_service(model_dir):
    rc, out = run(model_dir)
    assert rc == 0
    card = json.loads(out.with_suffix(".json").read_text())
    fp32 = json.loads((model_dir / "derefnet.json").read_text())
    assert card["file"] == out.name and card["sha256"] == file_sha256(out)
    assert card["parts"]["encoder"]["file"] == "derefnet-int8.encoder.onnx"
    assert card["parts"]["encoder"]["sha256"] == file_sha256(model_dir / "derefnet-int8.encoder.onnx")
    # the head is not quantized by default: the card names the fp32 head file, no copy is made
    assert card["parts"]["head"] == fp32["parts"]["head"]
    assert not (model_dir / "derefnet-int8.head.onnx").exists()
    assert card["precision"]["encoder"] == "int8 (QDQ)" and card["precision"]["head"] == "float32"
    q = card["quantization"]
    assert q["calibration"]["seed"] == quantize.DEFAULT_SEED and q["calibration"]["frames"] == 3 * 20
    assert q["command"].startswith("csist quantize --model ") and "--calibration-trajectories 3" in q["command"]
    assert q["source"]["sha256"] == fp32["sha256"] and card["metrics"] == {}
    # tiny model: 1 stage = 4 convs + 4 MatMuls (Phi^T L, Qinit L, and h Phi^T then (.) Phi in
    # the gradient step), all quantized
    assert q["graphs"]["encoder"]["nodes_quantized"] == 8 and q["graphs"]["single"]["nodes_quantized"] == 8
    enc_ops = ops(model_dir / "derefnet-int8.encoder.onnx")
    assert enc_ops.count("QuantizeLinear") > 0 and enc_ops.count("Conv") == 4
    single_ops = ops(out)
    assert single_ops.count("DeformConv") == 2 and single_ops.count("DequantizeLinear") > 0

    model = load_model(out)  # verifies every hash and the interface, as `csist serve` does
    assert model.has_parts and model.card.name == "derefnet" and model.card.version == "0.1.0+int8"
    ref = load_model(model_dir / "derefnet.onnx")
    windows = quantize.windows(quantize.calibration_frames(1, seed=5))[:4]
    want = ref.run(windows)
    scale = np.abs(want).max()
    got_single = model.run(windows)
    got_parts = model.head(model.encode(windows.reshape(-1, 11, 11)).reshape(4, 5, -1))
    # int8 is an approximation: close relative to the map's peak, and the two paths agree
    for got in (got_single, got_parts):
        assert np.abs(got - want).mean() < 0.02 * scale
    assert np.abs(got_single - got_parts).max() < 0.1 * scale


def test_head_option_keeps_deformconv_float(model_dir):
    rc, out = run(model_dir, "--head", "--no-per-channel")
    assert rc == 0
    head = model_dir / "derefnet-int8.head.onnx"
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["parts"]["head"]["file"] == head.name and card["parts"]["head"]["sha256"] == file_sha256(head)
    assert card["quantization"]["weights"] == "int8, per tensor"
    graph = onnx.load(str(head)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    deform = [n for n in graph.node if n.op_type == "DeformConv"]
    assert len(deform) == 2
    assert all(made_by.get(n.input[1]) != "DequantizeLinear" for n in deform)  # fp32 weights
    assert ops(head).count("QuantizeLinear") > 0
    assert load_model(out).has_parts


def test_nodes_to_quantize_leaves_the_head_alone(tiny_model):
    names = quantize.nodes_to_quantize(tiny_model, ["Conv", "MatMul"], head=False)
    graph = onnx.load(str(tiny_model)).graph
    by_name = {n.name: n for n in graph.node}
    assert len(names) == 8  # 4 convs + 4 MatMuls of the one encoder stage
    assert all(not any(i.startswith("head.") for i in by_name[n].input) for n in names)
    with_head = quantize.nodes_to_quantize(tiny_model, ["Conv", "MatMul", "DeformConv"], head=True)
    assert len(with_head) > len(names)
    assert all(by_name[n].op_type != "DeformConv" for n in with_head)


def test_map_drop_gate_removes_the_files(model_dir, tmp_path):
    from training.simulate import SimParams, generate

    data = tmp_path / "data"
    generate(data, 2, seed=4242, params=SimParams(), fractions=(0, 0, 1), progress=False)
    # any drop exceeds a negative allowance: the gate must fail and leave no int8 file behind
    rc, out = run(model_dir, "--eval-data", str(data), "--max-map-drop", "-1000")
    assert rc == 1
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not (model_dir / "derefnet-int8.encoder.onnx").exists()
    assert (model_dir / "derefnet.head.onnx").exists()  # the fp32 head it referenced is kept
    rc, out = run(model_dir, "--eval-data", str(data))
    assert rc == 0
    card = json.loads(out.with_suffix(".json").read_text())
    ev = card["quantization"]["evaluation"]
    assert ev["trajectories"] == 2 and ev["drop"] == pytest.approx(ev["fp32_mAP"] - ev["int8_mAP"])
    ((key, metrics),) = card["metrics"].items()
    assert key == "data:test:refine=none" and metrics["mAP"] == ev["int8_mAP"] and metrics["frames"] == 2 * 16


def test_refuses_a_model_whose_files_do_not_match_its_card(model_dir):
    card_path = model_dir / "derefnet.json"
    card = json.loads(card_path.read_text())
    card["parts"]["encoder"]["sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    rc, out = run(model_dir)
    assert rc == 2 and not out.exists()
