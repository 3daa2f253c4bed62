"""``csist quantize``: an int8 model folder that the service loads, DeformConv kept in float."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from service.modelpkg.manifest import file_sha256, load_package
from service.modelpkg.model import load_model
from tests.service.tiny_derefnet import tiny_model_path
from training import quantize


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_path(tmp_path_factory)


@pytest.fixture()
def model_dir(tiny_model, tmp_path):
    """A private copy of the tiny model's folder, in a models/ folder to quantize into."""
    shutil.copytree(tiny_model, tmp_path / "models" / "derefnet")
    return tmp_path / "models"


def run(model_dir, *extra):
    out = model_dir / "derefnet-int8"
    argv = [
        "--model",
        str(model_dir / "derefnet"),
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


def test_encoder_int8_folder_loads_in_the_service(model_dir):
    rc, out = run(model_dir)
    assert rc == 0
    package, fp32 = load_package(out), load_package(model_dir / "derefnet")  # written manifests validate
    manifest = package.manifest
    assert manifest.model.file == "model.onnx" and manifest.model.sha256 == file_sha256(out / "model.onnx")
    assert manifest.parts["encoder"].file == "encoder.onnx"
    assert manifest.parts["encoder"].sha256 == file_sha256(out / "encoder.onnx")
    # the head is not quantized by default: the folder holds a copy of the fp32 head
    assert manifest.parts["head"] == fp32.parts["head"] and (out / "head.onnx").is_file()
    assert set(manifest.parts) == {"encoder", "head"} and manifest.plans.amx_split is None
    assert manifest.quantized_from.model_dump() == {"package": "../derefnet", "sha256": fp32.sha256}
    assert manifest.interface == fp32.manifest.interface
    card = package.provenance.model_dump()
    assert card["precision"]["encoder"] == "int8 (QDQ)" and card["precision"]["head"] == "float32"
    assert card["training"] == fp32.provenance.training and card["metrics"] == {}
    q = card["quantization"]
    assert q["calibration"]["seed"] == quantize.DEFAULT_SEED and q["calibration"]["frames"] == 3 * 20
    assert q["command"].startswith("csist quantize --model ") and "--calibration-trajectories 3" in q["command"]
    assert q["source"]["sha256"] == fp32.sha256
    # tiny model: 1 stage = 4 convs + 4 MatMuls (Phi^T L, Qinit L, and h Phi^T then (.) Phi in
    # the gradient step), all quantized
    assert q["graphs"]["encoder"]["nodes_quantized"] == 8 and q["graphs"]["single"]["nodes_quantized"] == 8
    enc_ops = ops(out / "encoder.onnx")
    assert enc_ops.count("QuantizeLinear") > 0 and enc_ops.count("Conv") == 4
    single_ops = ops(out / "model.onnx")
    assert single_ops.count("DeformConv") == 2 and single_ops.count("DequantizeLinear") > 0

    model = load_model(out)  # verifies every hash and the interface, as `csist serve` does
    assert model.has_parts and model.card.name == "derefnet" and model.card.version == "0.1.0+int8"
    ref = load_model(model_dir / "derefnet")
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
    head = out / "head.onnx"
    package = load_package(out)
    assert package.parts["head"].file == head.name and package.parts["head"].sha256 == file_sha256(head)
    assert package.provenance.quantization["weights"] == "int8, per tensor"
    graph = onnx.load(str(head)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    deform = [n for n in graph.node if n.op_type == "DeformConv"]
    assert len(deform) == 2
    assert all(made_by.get(n.input[1]) != "DequantizeLinear" for n in deform)  # fp32 weights
    assert ops(head).count("QuantizeLinear") > 0
    assert load_model(out).has_parts


def test_nodes_to_quantize_leaves_the_head_alone(tiny_model):
    names = quantize.nodes_to_quantize(tiny_model / "model.onnx", ["Conv", "MatMul"], head=False)
    graph = onnx.load(str(tiny_model / "model.onnx")).graph
    by_name = {n.name: n for n in graph.node}
    assert len(names) == 8  # 4 convs + 4 MatMuls of the one encoder stage
    assert all(not any(i.startswith("head.") for i in by_name[n].input) for n in names)
    with_head = quantize.nodes_to_quantize(tiny_model / "model.onnx", ["Conv", "MatMul", "DeformConv"], head=True)
    assert len(with_head) > len(names)
    assert all(by_name[n].op_type != "DeformConv" for n in with_head)


def test_map_drop_gate_removes_the_files(model_dir, tmp_path):
    from training.simulate import SimParams, generate

    data = tmp_path / "data"
    generate(data, 2, seed=4242, params=SimParams(), fractions=(0, 0, 1), progress=False)
    # any drop exceeds a negative allowance: the gate must fail and leave no int8 file behind
    rc, out = run(model_dir, "--eval-data", str(data), "--max-map-drop", "-1000")
    assert rc == 1
    assert not any(out.iterdir())  # no int8 file, no manifest
    assert (model_dir / "derefnet" / "head.onnx").exists()  # the fp32 model is untouched
    rc, out = run(model_dir, "--eval-data", str(data))
    assert rc == 0
    provenance = load_package(out).provenance
    ev = provenance.quantization["evaluation"]
    assert ev["trajectories"] == 2 and ev["drop"] == pytest.approx(ev["fp32_mAP"] - ev["int8_mAP"])
    ((key, metrics),) = provenance.metrics.items()
    assert key == "data:test:refine=none" and metrics["mAP"] == ev["int8_mAP"] and metrics["frames"] == 2 * 16


def test_refuses_a_model_whose_files_do_not_match_its_manifest(model_dir):
    with open(model_dir / "derefnet" / "encoder.onnx", "ab") as fh:
        fh.write(b"\0")
    rc, out = run(model_dir)
    assert rc == 2 and not out.exists()
    rc, _ = run(model_dir, "--out", str(model_dir / "derefnet"))
    assert rc == 2  # one folder per model
