"""``csist split-head``: the head cut at its DeformConv nodes, verified and run with the native kernel."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from service.kernels import deform
from service.modelpkg.manifest import file_sha256, load_package, read_manifest, write_package
from service.modelpkg.model import ModelError, load_model
from tests.service.tiny_derefnet import tiny_model_path
from training import export, split_head

pytestmark = pytest.mark.skipif(not deform.AVAILABLE, reason="service.kernels._deform is not built")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_path(tmp_path_factory)


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """A private copy of the tiny model's folder, to alter."""
    shutil.copytree(tiny_model, tmp_path / tiny_model.name)
    return tmp_path / tiny_model.name


def rewrite(folder, head_split="keep", **update):
    """The folder's manifest written anew through the writer, with ``update`` of its fields and
    ``head_split`` replaced (None: dropped)."""
    manifest = load_package(folder).manifest
    if head_split != "keep":
        update["plans"] = manifest.plans.model_copy(update={"head_split": head_split})
    write_package(folder, manifest.model_copy(update=update))


def features(model, n=3, seed=5):
    windows = export.sample_windows(n, seed=seed)
    return model.encode(windows.reshape(-1, 11, 11)).reshape(n, 5, -1)


def test_export_splits_the_head_and_records_it(tiny_model):
    manifest = read_manifest(tiny_model / "manifest.json")  # the written manifest validates
    entry = manifest.plans.head_split
    assert entry.part == manifest.parts["head"].file == "head.onnx"
    assert [s.file for s in entry.segments] == [f"head.seg{i}.onnx" for i in range(3)]
    assert entry.weights.file == "head.deform.npz"
    for spec in [*entry.segments, entry.weights]:
        assert file_sha256(tiny_model / spec.file) == spec.sha256
    assert {f.file for f in manifest.files} >= {s.file for s in entry.segments} | {entry.weights.file}
    ops = [[n.op_type for n in onnx.load(str(tiny_model / s.file)).graph.node] for s in entry.segments]
    assert all("DeformConv" not in o for o in ops) and all(ops)
    assert [s.op for s in entry.steps] == ["DeformConv"] * 2
    record = load_package(tiny_model).provenance.plans["head_split"]
    assert record["command"].startswith("csist split-head --model ")
    diffs = record["check"]["relative_diff"]
    assert diffs["segments_vs_head"] < 1e-6 and diffs["deform_kernel_vs_onnxruntime"] < 1e-4


def test_native_head_equals_the_onnx_head(tiny_model):
    native = load_model(tiny_model, deform_kernel="native")
    plain = load_model(tiny_model, deform_kernel="onnxruntime")
    assert native.deform_kernel == "native" and plain.deform_kernel == "onnxruntime"
    assert load_model(tiny_model).deform_kernel == "native"  # auto
    feats = features(native)
    want = plain.head(feats)
    got = native.head(feats)
    assert got.shape == want.shape == (3, 33, 33)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    # the deformable sampling matters in this model: zero offsets would change the answer
    assert np.abs(want).max() > 10


def test_altered_segment_or_weights_are_refused(model_copy):
    entry = load_package(model_copy).head_split
    seg = model_copy / entry.segments[1].file
    original = seg.read_bytes()
    seg.write_bytes(original + b"\0")
    with pytest.raises(ModelError, match="SHA-256 mismatch: head segment 1"):
        load_model(model_copy)
    assert load_model(model_copy, deform_kernel="onnxruntime").deform_kernel == "onnxruntime"
    seg.write_bytes(original)
    (model_copy / entry.weights.file).unlink()
    with pytest.raises(ModelError, match="head split weights not found"):
        load_model(model_copy)


def test_native_required_but_not_possible(model_copy):
    rewrite(model_copy, head_split=None)
    assert not (model_copy / "head.seg0.onnx").exists()  # the writer removed the plan's files
    assert load_model(model_copy).deform_kernel == "onnxruntime"  # auto falls back
    with pytest.raises(ModelError, match="no head_split"):
        load_model(model_copy, deform_kernel="native")
    with pytest.raises(ModelError, match="streaming parts are not loaded"):
        load_model(model_copy, parts=False, deform_kernel="native")
    with pytest.raises(ModelError, match="deform_kernel='fast'"):
        load_model(model_copy, deform_kernel="fast")


def test_split_from_another_head_is_refused(model_copy):
    rewrite(model_copy, head_split=load_package(model_copy).head_split.model_copy(update={"part": "other.onnx"}))
    with pytest.raises(ModelError, match="was cut from 'other.onnx'"):
        load_model(model_copy)


def test_resplit_gives_the_same_files(model_copy):
    before = load_package(model_copy)
    assert split_head.main(["--model", str(model_copy), "--parity-windows", "3"]) == 0
    after = load_package(model_copy)
    assert after.head_split == before.head_split  # the same files, hashes and steps
    record = after.provenance.plans["head_split"]
    assert record["check"]["windows"] == 3
    assert record["command"] == f"csist split-head --model {model_copy} --parity-windows 3"


def test_unsupported_deformconv_is_refused(model_copy):
    head = model_copy / load_package(model_copy).parts["head"].file
    proto = onnx.load(str(head))
    node = next(n for n in proto.graph.node if n.op_type == "DeformConv")
    for attr in node.attribute:
        if attr.name == "dilations":
            attr.ints[:] = [2, 2]
    onnx.save(proto, str(head))
    with pytest.raises(split_head.SplitError, match="dilations"):
        split_head.split_graph(head)


def test_cli_help_and_missing_head(model_copy, capsys):
    with pytest.raises(SystemExit) as exc:
        split_head.main(["--help"])
    assert exc.value.code == 0 and "DeformConv" in capsys.readouterr().out
    rewrite(model_copy, parts={})
    with pytest.raises(SystemExit, match="lists no streaming head"):
        split_head.main(["--model", str(model_copy)])
    flat = model_copy.parent / "derefnet.onnx"  # the flat layout: the graph and its card beside it
    shutil.copy(model_copy / "model.onnx", flat)
    flat.with_suffix(".json").write_text(json.dumps({"sha256": file_sha256(flat), "inputs": [], "parts": {}}))
    with pytest.raises(SystemExit, match="old flat layout.*csist migrate-model"):
        split_head.main(["--model", str(flat)])


def test_without_the_built_kernel_auto_falls_back_and_native_refuses(tiny_model, monkeypatch):
    monkeypatch.setattr(deform, "AVAILABLE", False)
    assert load_model(tiny_model).deform_kernel == "onnxruntime"
    with pytest.raises(ModelError, match="not built"):
        load_model(tiny_model, deform_kernel="native")


def test_failed_split_leaves_the_previous_one_intact(model_copy):
    before = {name: (model_copy / name).read_text() for name in ("manifest.json", "provenance.json")}
    files = sorted(p.name for p in model_copy.iterdir())
    with pytest.raises(split_head.SplitError, match="native kernel differs"):
        split_head.split_head(model_copy, export.sample_windows(2), 0.0, "test")  # tolerance 0 fails
    assert {name: (model_copy / name).read_text() for name in before} == before
    assert sorted(p.name for p in model_copy.iterdir()) == files  # no .tmp left, none removed
    assert load_model(model_copy).deform_kernel == "native"


def test_a_split_writes_only_inside_its_model_folder(model_copy):
    """Two models (an int8 variant holds a copy of the float32 head) never share split files."""
    other = model_copy.with_name("other")
    shutil.copytree(model_copy, other)
    mine = load_package(model_copy).head_split
    for spec in [*mine.segments, mine.weights]:
        (other / spec.file).unlink()
    entry, record = split_head.split_head(other, export.sample_windows(2), 1e-4, "test")
    assert [s.file for s in entry.segments] == [f"head.seg{i}.onnx" for i in range(3)] and record["command"] == "test"
    for spec in [*mine.segments, mine.weights]:  # the first model's files are untouched
        assert file_sha256(model_copy / spec.file) == spec.sha256
    assert load_model(model_copy).deform_kernel == load_model(other).deform_kernel == "native"


def test_head_changed_after_the_split_is_refused(model_copy):
    rewrite(model_copy, head_split=load_package(model_copy).head_split.model_copy(update={"part_sha256": "0" * 64}))
    with pytest.raises(ModelError, match="run `csist split-head` again"):
        load_model(model_copy)


def _conv_graph(tmp_path, after: str, **conv_attrs):
    """A one-Conv graph (32 -> 32 channels, 3x3) followed by ``after`` ("relu", "shrink",
    "relu_shared", "shrink_reversed"), saved as an ONNX file."""
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    attrs = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3], **conv_attrs}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)]
    consts = {
        "w": np.ones((32, 32, 3, 3), np.float32),
        "b": np.zeros(32, np.float32),
        "lo": np.float32(-0.1),
        "hi": np.float32(0.1),
    }
    outputs = ["z"]
    if after in ("relu", "relu_shared"):
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
        if after == "relu_shared":
            nodes.append(helper.make_node("Neg", ["y"], ["n"]))
            outputs.append("n")
    else:
        lo, hi = ("hi", "lo") if after == "shrink_reversed" else ("lo", "hi")
        nodes += [helper.make_node("Clip", ["y", lo, hi], ["c"]), helper.make_node("Sub", ["y", "c"], ["z"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", f32, [None, 32, 7, 7])],
        [helper.make_tensor_value_info(o, f32, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items()],
    )
    path = tmp_path / f"{after}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), str(path))
    return path


@pytest.mark.parametrize(
    "after,activation,steps",
    [("relu", "relu", 1), ("shrink", "soft_threshold", 1), ("relu_shared", "none", 1), ("shrink_reversed", "none", 1)],
)
def test_activations_are_folded_only_when_exact(tmp_path, after, activation, steps):
    protos, found, _ = split_head.split_graph(_conv_graph(tmp_path, after), convs=True)
    assert len(found) == steps and found[0]["activation"] == activation
    if activation == "soft_threshold":
        np.testing.assert_allclose(found[0]["clip"], [-0.1, 0.1], rtol=1e-6)
    else:
        assert found[0]["clip"] is None
    kept = [n.op_type for p in protos if p is not None for n in p.graph.node]
    if activation == "none":  # the activation stays in a segment after the step
        assert set(kept) & {"Relu", "Clip"}


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 2]},
        {"dilations": [2, 2]},
        {"pads": [0, 0, 0, 0]},
        {"pads": [1, 1, 0, 0]},
        {"auto_pad": "SAME_UPPER", "pads": None},
    ],
)
def test_convs_the_kernels_compute_differently_stay_in_onnx(tmp_path, attrs):
    attrs = {k: v for k, v in attrs.items() if v is not None}
    path = _conv_graph(tmp_path, "relu", **attrs)
    if "auto_pad" in attrs:  # auto_pad and pads are exclusive in ONNX
        proto = onnx.load(str(path))
        conv_node = proto.graph.node[0]
        del conv_node.attribute[:]
        conv_node.attribute.extend(
            [onnx.helper.make_attribute("auto_pad", "SAME_UPPER"), onnx.helper.make_attribute("kernel_shape", [3, 3])]
        )
        onnx.save(proto, str(path))
    with pytest.raises(split_head.SplitError, match="no node for the native kernels"):
        split_head.split_graph(path, convs=True)
