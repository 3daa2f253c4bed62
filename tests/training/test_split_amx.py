"""``csist split-amx``: encoder and head cut at their convolutions, checked, and served on AMX."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from service.kernels import conv, deform
from service.modelpkg.manifest import file_sha256, load_package, write_package
from service.modelpkg.model import ModelError, load_model
from tests.service.tiny_derefnet import tiny_model_path
from training import export, split_amx

pytestmark = pytest.mark.skipif(not deform.AVAILABLE, reason="service.kernels._deform is not built")
needs_amx = pytest.mark.skipif(not conv.AMX, reason=f"no AMX here: {conv.WHY_NOT_AMX}")


@pytest.fixture(scope="module")
def split_model(tmp_path_factory):
    """The 32-channel tiny model, split for AMX once (in its own folder copy)."""
    if not conv.AMX:
        pytest.skip(f"no AMX here: {conv.WHY_NOT_AMX}")
    src = tiny_model_path(tmp_path_factory, channels=32)
    model = tmp_path_factory.mktemp("amx") / src.name
    shutil.copytree(src, model)
    assert split_amx.main(["--model", str(model), "--parity-windows", "3"]) == 0
    return model


@pytest.fixture
def model_copy(split_model, tmp_path):
    shutil.copytree(split_model, tmp_path / split_model.name)
    return tmp_path / split_model.name


def amx_record(folder) -> dict:
    """The plan amx_split of the folder's manifest with its provenance record (command, checks)."""
    package = load_package(folder)
    return {**package.amx_split.model_dump(mode="json"), **package.provenance.plans["amx_split"]}


def rewrite_amx(folder, amx_split) -> None:
    """The folder's manifest written anew through the writer, its amx_split replaced."""
    manifest = load_package(folder).manifest
    write_package(
        folder, manifest.model_copy(update={"plans": manifest.plans.model_copy(update={"amx_split": amx_split})})
    )


def test_the_manifest_records_the_split_and_the_provenance_its_checks(split_model):
    package = load_package(split_model)
    entry = amx_record(split_model)
    assert entry["precision"] == "bfloat16" and entry["command"].startswith("csist split-amx --model")
    enc, head = entry["encoder"], entry["head"]
    assert enc["part"] == package.parts["encoder"].file and head["part"] == package.parts["head"].file
    assert [s["file"] for s in enc["segments"] if s][0] == "amx/encoder.seg0.onnx"
    assert enc["weights"]["file"] == "amx/encoder.weights.npz" and head["weights"]["file"] == "amx/head.weights.npz"
    # one ISTA stage: 1->32 direct (+ReLU), 32->32 AMX (+soft threshold), 32->32 AMX (+ReLU), 32->1 direct
    assert [(s["kernel"], s["activation"]) for s in enc["steps"]] == [
        ("direct", "relu"),
        ("amx", "soft_threshold"),
        ("amx", "relu"),
        ("direct", "none"),
    ]
    lo, hi = enc["steps"][1]["clip"]
    assert lo == -hi and hi > 0
    ops = [(s["op"], s.get("kernel")) for s in head["steps"]]
    assert ops.count(("DeformConv", "amx")) == 2 and ops.count(("Conv", "amx")) == 4  # 2 offsets + 1 res block
    # the selective attention is one native step (its 2 -> 2 conv with it), reading the two embeddings
    attention_steps = [s for s in head["steps"] if s["op"] == "Attention"]
    assert len(attention_steps) == 1 and ops.count(("Conv", "direct")) == 5  # 2 embeddings, out, fusion in, out
    assert set(attention_steps[0]["extra"]) == {"nb_weight", "nb_bias", "mix_weight", "mix_bias"}
    embeddings = [s["output"] for s in head["steps"][:2]]
    assert attention_steps[0]["inputs"] == embeddings
    # the residual block's Add is folded into its second conv, which reads the block's input too
    (res_step,) = [s for s in head["steps"] if s.get("residual")]
    first = head["steps"][head["steps"].index(res_step) - 1]
    assert res_step["inputs"] == [first["output"], first["inputs"][0]] and res_step["kernel"] == "amx"
    for part in (enc, head):
        for spec in [*(s for s in part["segments"] if s), part["weights"]]:
            assert file_sha256(split_model / spec["file"]) == spec["sha256"]
        for seg in (s for s in part["segments"] if s):
            nodes = onnx.load(str(split_model / seg["file"])).graph.node
            assert not any(n.op_type == "DeformConv" for n in nodes)
    d = entry["check"]["relative_diff"]
    assert d["segments_vs_encoder"] < 1e-6 and d["segments_vs_head"] < 1e-5
    assert d["direct_conv_kernel_vs_onnxruntime"] < 1e-5
    assert 1e-5 < d["amx_conv_kernel_vs_onnxruntime"] < 2e-2  # bfloat16: close, not exact
    assert d["chains_vs_steps_encoder"] == d["chains_vs_steps_head"] == 0.0  # the same numbers
    assert d["head_attention_kernel_vs_onnxruntime"] < 1e-5  # float32, against ONNX Runtime's 13 nodes


def test_served_split_is_close_to_float32(split_model):
    amx = load_model(split_model)  # auto picks the AMX split on this CPU
    fp32 = load_model(split_model, conv_kernel="onnxruntime")
    assert (amx.conv_kernel, amx.deform_kernel) == ("amx", "amx")
    assert fp32.conv_kernel == "onnxruntime" and fp32.split_encoder is None
    windows = export.sample_windows(4, seed=9)
    frames = windows.reshape(-1, 11, 11)
    feats_amx, feats = amx.encode(frames), fp32.encode(frames)
    assert np.abs(feats_amx - feats).max() < 2e-2 * np.abs(feats).max()
    maps_amx = amx.head(feats.reshape(4, 5, -1))
    maps = fp32.head(feats.reshape(4, 5, -1))
    assert maps.shape == maps_amx.shape == (4, 33, 33)
    assert np.abs(maps_amx - maps).max() < 2e-2 * np.abs(maps).max()
    assert not np.array_equal(maps_amx, maps)  # it really ran another kernel


def test_served_split_runs_its_conv_runs_as_chains_with_the_same_numbers(split_model):
    """Each ISTA stage (direct, AMX, AMX, direct; nothing else reads the intermediates) is one
    chain step; a residual body's two AMX convs too; a conv whose output other nodes read stays
    alone. Chained or not, the numbers are the same bit for bit."""
    fused, plain = load_model(split_model), load_model(split_model, fuse_convs=False)
    stages = load_package(split_model).manifest.interface.config["stages"]
    encoder_ops = [s.op for s in fused.split_encoder.steps]
    assert encoder_ops == ["ConvChain"] * stages
    assert all(len(s.kernel.convs) == 4 for s in fused.split_encoder.steps)
    assert len(plain.split_encoder.steps) == 4 * stages and "ConvChain" not in plain.split_encoder.ops
    assert len(fused.split_encoder.segments) == len(fused.split_encoder.steps) + 1
    head_ops = [s.op for s in fused.split_head.steps]
    assert "ConvChain" in head_ops and "DeformConv" in head_ops and "Conv" in head_ops
    (block,) = [s for s in fused.split_head.steps if s.op == "ConvChain"]
    assert block.kernel.residual and block.inputs[0] == block.inputs[1]  # x + body(x)
    assert len(fused.split_head.steps) < len(plain.split_head.steps)
    frames = export.sample_windows(6, seed=11).reshape(-1, 11, 11)
    feats = fused.encode(frames)
    np.testing.assert_array_equal(feats, plain.encode(frames))
    np.testing.assert_array_equal(fused.head(feats.reshape(6, 5, -1)), plain.head(feats.reshape(6, 5, -1)))


def test_conv_kernel_choices(model_copy):
    with pytest.raises(ModelError, match="conv_kernel='fast'"):
        load_model(model_copy, conv_kernel="fast")
    with pytest.raises(ModelError, match="deform_kernel='onnxruntime'"):
        load_model(model_copy, conv_kernel="amx", deform_kernel="onnxruntime")
    assert load_model(model_copy, deform_kernel="onnxruntime").conv_kernel == "onnxruntime"  # auto steps back
    rewrite_amx(model_copy, None)
    assert not (model_copy / "amx").exists()  # the writer removed the plan's files
    assert load_model(model_copy).conv_kernel == "onnxruntime"
    with pytest.raises(ModelError, match="no amx_split"):
        load_model(model_copy, conv_kernel="amx")


def test_without_amx_auto_falls_back_and_amx_refuses(split_model, monkeypatch):
    monkeypatch.setattr(conv, "AMX", False)
    monkeypatch.setattr(conv, "WHY_NOT_AMX", "the CPU has no AMX-TILE/AMX-BF16")
    assert load_model(split_model).conv_kernel == "onnxruntime"
    with pytest.raises(ModelError, match="no AMX-TILE"):
        load_model(split_model, conv_kernel="amx")


def test_altered_or_stale_split_is_refused(model_copy):
    amx = load_package(model_copy).amx_split
    seg = model_copy / next(s for s in amx.encoder.segments if s).file
    original = seg.read_bytes()
    seg.write_bytes(original + b"\0")
    with pytest.raises(ModelError, match="SHA-256 mismatch: encoder segment"):
        load_model(model_copy)
    assert load_model(model_copy, conv_kernel="onnxruntime").conv_kernel == "onnxruntime"  # not needed then
    seg.write_bytes(original)
    rewrite_amx(model_copy, amx.model_copy(update={"head": amx.head.model_copy(update={"part_sha256": "0" * 64})}))
    with pytest.raises(ModelError, match="run `csist split-amx` again"):
        load_model(model_copy)


def test_resplit_is_deterministic_and_a_failed_one_keeps_the_old(model_copy):
    before = load_package(model_copy).amx_split
    assert split_amx.main(["--model", str(model_copy), "--parity-windows", "2"]) == 0
    assert load_package(model_copy).amx_split == before  # the same files, hashes and steps
    assert amx_record(model_copy)["check"]["windows"] == 2
    texts = {name: (model_copy / name).read_text() for name in ("manifest.json", "provenance.json")}
    files = sorted(p.relative_to(model_copy).as_posix() for p in model_copy.rglob("*"))
    with pytest.raises(SystemExit, match="amx_conv_kernel_vs_onnxruntime"):
        split_amx.main(["--model", str(model_copy), "--parity-windows", "2", "--bf16-tolerance", "0"])
    assert {name: (model_copy / name).read_text() for name in texts} == texts
    assert sorted(p.relative_to(model_copy).as_posix() for p in model_copy.rglob("*")) == files  # no .tmp left
    assert load_model(model_copy).conv_kernel == "amx"


def test_resplit_removes_the_files_only_the_previous_split_used(model_copy):
    """A cut that moved (here: a segment the previous manifest listed that this split does not
    make) leaves no orphan; files the manifest never listed are not touched."""
    amx = load_package(model_copy).amx_split
    stale, foreign = "amx/head.seg99.onnx", "amx/notes.txt"
    for name in (stale, foreign):
        (model_copy / name).write_text("x")
    head = amx.head.model_copy(update={"segments": [*amx.head.segments, amx.head.segments[0]]})
    head.segments[-1] = head.segments[-1].model_copy(update={"file": stale, "sha256": file_sha256(model_copy / stale)})
    head.steps.append(head.steps[-1])
    rewrite_amx(model_copy, amx.model_copy(update={"head": head}))
    assert stale in {f.file for f in load_package(model_copy).manifest.files}
    assert split_amx.main(["--model", str(model_copy), "--parity-windows", "2"]) == 0
    assert not (model_copy / stale).exists() and (model_copy / foreign).exists()
    listed = {f.file for f in load_package(model_copy).manifest.files}
    assert all((model_copy / name).is_file() for name in listed) and stale not in listed


def test_attention_is_left_to_onnx_runtime_unless_it_is_exactly_the_kernels(split_model, tmp_path):
    """An intermediate of the attention that something else reads (here: a graph output) keeps the
    nodes in ONNX Runtime; its 3x3 conv is then a direct conv step again."""
    import onnx
    from onnx import helper

    from training.split_head import split_graph

    head_file = split_model / load_package(split_model).parts["head"].file
    head = onnx.load(str(head_file))
    assert any(s.get("op") == "Attention" for s in split_graph(head_file, convs=True)[1])
    stats = next(n for n in head.graph.node if n.op_type == "ReduceMax").output[0]
    head.graph.output.append(helper.make_tensor_value_info(stats, onnx.TensorProto.FLOAT, None))
    altered = tmp_path / "head.onnx"
    onnx.save(head, str(altered))
    steps = split_graph(altered, convs=True)[1]
    assert not any(s["op"] == "Attention" for s in steps)
    assert [s["kernel"] for s in steps if s["op"] == "Conv"].count("direct") == 6  # with the 2 -> 2 conv


@needs_amx
def test_a_model_without_amx_convolutions_is_refused(tmp_path_factory, capsys):
    small = tiny_model_path(tmp_path_factory)  # 4 channels: nothing for the AMX kernel
    with pytest.raises(SystemExit, match="no Conv the AMX kernel computes"):
        split_amx.main(["--model", str(small), "--parity-windows", "2"])
    with pytest.raises(SystemExit) as exc:
        split_amx.main(["--help"])
    assert exc.value.code == 0 and "bfloat16" in capsys.readouterr().out


def test_the_heads_halves_are_split_too_and_their_pairs_give_the_heads_numbers(split_model):
    """align (one neighbour's alignment) and fuse (the rest of the head) are cut like the head;
    served, the pair path computes exactly the head's map: the same kernels on the same rows."""
    entry = amx_record(split_model)
    align_ops = [(s["op"], s.get("kernel")) for s in entry["align"]["steps"]]
    head_ops = [(s["op"], s.get("kernel")) for s in entry["head"]["steps"]]
    fuse_ops = [(s["op"], s.get("kernel")) for s in entry["fuse"]["steps"]]
    assert align_ops.count(("DeformConv", "amx")) == 2 and ("Attention", None) in align_ops
    assert sorted(align_ops + fuse_ops) == sorted(head_ops)  # the head's steps, shared out
    d = entry["check"]["relative_diff"]
    assert d["amx_pairs_vs_head"] == 0.0 and d["chains_vs_steps_align"] == d["chains_vs_steps_fuse"] == 0.0
    assert d["segments_vs_align"] < 1e-5 and d["segments_vs_fuse"] < 1e-5
    model = load_model(split_model)
    assert model.has_pairs and model.split_align is not None and model.split_fuse is not None
    feats = model.encode(export.sample_windows(5, seed=13).reshape(-1, 11, 11)).reshape(5, 5, -1)
    np.testing.assert_array_equal(export.pair_maps(model.align, model.fuse, feats), model.head(feats))


def test_float32_check_cuts_as_the_amx_split_does_on_any_host(tmp_path_factory):
    """Without AMX the split is cut the same way and the cut checked with float32 kernels in place
    of the AMX ones; the provenance says so, and an AMX host would make the same files."""
    src = tiny_model_path(tmp_path_factory, channels=32)
    model = tmp_path_factory.mktemp("f32") / src.name
    shutil.copytree(src, model)
    if not conv.AMX:
        with pytest.raises(SystemExit, match="--float32-check"):
            split_amx.main(["--model", str(model), "--parity-windows", "2"])
    with pytest.raises(SystemExit, match="--eval-data"):
        split_amx.main(["--model", str(model), "--float32-check", "--eval-data", str(model)])
    assert load_package(model).amx_split is None  # a refused split writes nothing
    assert split_amx.main(["--model", str(model), "--parity-windows", "2", "--float32-check"]) == 0
    package = load_package(model)
    record = package.provenance.plans["amx_split"]["check"]
    assert "float32 in place of AMX" in record["kernels"]
    diffs = record["relative_diff"]
    for part in ("encoder", "head", "align", "fuse"):
        assert diffs[f"segments_vs_{part}"] <= 1e-4 and diffs[f"split_vs_{part}"] <= 1e-4
    assert diffs["direct_conv_kernel_vs_onnxruntime"] <= 1e-4 and diffs["head_deform_kernel_vs_onnxruntime"] <= 1e-4
    assert not any("amx_" in k or "onnxruntime_conv_kernel" in k for k in diffs)
    steps = package.amx_split.encoder.steps
    assert any(s.kernel == "amx" for s in steps)  # the plan is the AMX one, for an AMX host to serve
    if conv.AMX:
        checked = tmp_path_factory.mktemp("amx2") / src.name
        shutil.copytree(src, checked)
        assert split_amx.main(["--model", str(checked), "--parity-windows", "2"]) == 0
        assert load_package(checked).amx_split == package.amx_split
    else:
        served = load_model(model)
        assert served.conv_kernel != "amx"  # this host serves without it
