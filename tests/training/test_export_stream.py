"""``csist export`` writes the streaming encoder and head beside the single graph, in the model
folder whose manifest lists them."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.modelpkg.manifest import file_sha256, load_package, read_manifest
from tests.service.tiny_derefnet import tiny_model_path, write_checkpoint
from training import export
from training.model import load_checkpoint_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_path(tmp_path_factory)


def test_parts_are_listed_with_hashes_and_shapes(tiny_model):
    parts = read_manifest(tiny_model / "manifest.json").parts  # the written manifest validates
    paths = export.part_paths(tiny_model)
    assert {k: p.relative_to(tiny_model).as_posix() for k, p in paths.items()} == {
        "encoder": "encoder.onnx",
        "head": "head.onnx",
        "align": "align.onnx",
        "fuse": "fuse.onnx",
    }
    for name, path in paths.items():
        assert parts[name].file == path.name and parts[name].sha256 == file_sha256(path)
        assert parts[name].bytes == path.stat().st_size
    assert parts["encoder"].inputs[0].shape == ["n", 11, 11]
    assert parts["encoder"].outputs[0].shape == ["n", 1089]
    assert parts["head"].inputs[0].shape == ["batch", 5, 1089]
    assert parts["head"].outputs[0].shape == ["batch", 33, 33]
    assert parts["align"].inputs[0].shape == ["n", 5, 1089]
    assert parts["align"].outputs[0].shape == ["n", 1089]
    assert parts["fuse"].outputs[0].shape == ["batch", 33, 33]


def test_align_then_fuse_is_the_head(tiny_model):
    """The head's halves, with the window laid out by service.science.windows, give the head's map; the
    align part reads only the middle row and the neighbour's row (zeros elsewhere)."""
    assert load_package(tiny_model).provenance.export["parts"]["max_abs_diff_align_fuse_vs_head"] < 1e-4
    sessions = {name: ort.InferenceSession(str(path)) for name, path in export.part_paths(tiny_model).items()}
    windows = export.sample_windows(3, seed=8)
    feats = sessions["encoder"].run(None, {"lr_frames": windows.reshape(-1, 11, 11)})[0].reshape(3, 5, -1)
    head = sessions["head"].run(None, {"features": feats})[0]
    align = lambda x: sessions["align"].run(None, {"pair_features": x})[0]  # noqa: E731
    fuse = lambda x: sessions["fuse"].run(None, {"stack": x})[0]  # noqa: E731
    np.testing.assert_allclose(export.pair_maps(align, fuse, feats), head, atol=1e-4)
    pairs, _ = export.pair_inputs(feats)
    shuffled = pairs.copy()
    shuffled[:, 1] = 0  # position 1's row: only pairs at position 1 change
    moved = align(shuffled) != align(pairs)
    b = len(feats)
    assert moved[b : 2 * b].any() and not moved[:b].any() and not moved[2 * b :].any()


def test_parts_keep_the_units_of_the_torch_model(tiny_model):
    """Features in network units (/scale), HR out in sensor units, equal to DeRefNet.forward."""
    model = load_checkpoint_model(tiny_model.parent / "tiny.pt")
    model.set_deform_mode("torchvision")
    windows = export.sample_windows(3, seed=7)
    enc = ort.InferenceSession(str(export.part_paths(tiny_model)["encoder"]))
    head = ort.InferenceSession(str(export.part_paths(tiny_model)["head"]))
    feats = enc.run(None, {"lr_frames": windows.reshape(-1, 11, 11)})[0]
    with torch.no_grad():
        want_feats = model.encoder(torch.from_numpy(windows.reshape(15, -1)), with_symmetry=False)[0]
        want = model(torch.from_numpy(windows)).numpy()
    np.testing.assert_allclose(feats, want_feats.numpy(), atol=1e-5)
    got = head.run(None, {"features": feats.reshape(3, 5, -1)})[0]
    # float32 in two runtimes: compare relative to the output's scale (sensor units, > 10)
    scale = np.abs(want).max()
    assert scale > 10 and np.abs(got - want).max() < 1e-3 + 2e-5 * scale


def test_folded_gates_equal_the_position_encoding(tiny_model):
    model = load_checkpoint_model(tiny_model.parent / "tiny.pt")
    part = export.HeadPart(model)
    feats = torch.randn(2, 5, 1089)
    with torch.no_grad():
        assert torch.allclose(part.head.temporal(feats), model.head.temporal(feats), atol=1e-6)
        assert torch.allclose(part(feats), model.head(feats)[0] * model.cfg.scale, atol=1e-4)


def test_no_parts_flag_and_parity_failure(tiny_model, tmp_path, monkeypatch):
    """Exported again into a model folder, the model's previous files that the new manifest does
    not list (parts, splits) go; a file the manifest never listed stays."""
    ckpt = write_checkpoint(tmp_path / "t.pt", seed=3)
    out = tmp_path / "m"
    shutil.copytree(tiny_model, out)
    (out / "notes.txt").write_text("not the model's")
    with pytest.raises(SystemExit, match="--out is the model folder"):
        export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")])
    assert export.main(["--checkpoint", str(ckpt), "--out", str(out), "--parity-windows", "2", "--no-parts"]) == 0
    package = load_package(out)
    assert package.parts == {} and package.head_split is None
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "notes.txt", "provenance.json"]
    assert package.sha256 == file_sha256(out / "model.onnx") != load_package(tiny_model).sha256
    # a head that is not the model's must fail the parity check against the single graph
    model = load_checkpoint_model(ckpt)
    with torch.no_grad():
        model.head.fusion.body[-1].weight.mul_(2.0)
    paths = export.export_parts(model, out)
    with pytest.raises(RuntimeError, match="differ from the single graph"):
        export.check_parts(out / "model.onnx", paths, export.sample_windows(2, seed=1), stages=1)


def test_the_bundled_model_is_the_export_of_the_committed_fine_tuned_checkpoint():
    """The provenance's story holds: models/derefnet computes what the committed checkpoint of the
    fine-tune computes, and both name the field data it was trained on."""
    package = load_package("models/derefnet")
    path = "models/checkpoints/derefnet-field.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert {k: ckpt["config"][k] for k in package.manifest.interface.config} == package.manifest.interface.config
    assert ckpt["state"]["step"] == package.provenance.training["steps"]
    assert ckpt["state"]["init"]["checkpoint"] == "models/checkpoints/derefnet-last.pt"
    assert any("--scenario field" in c for c in package.provenance.data["commands"])
    model = load_checkpoint_model(path)
    model.set_deform_mode("torchvision")
    windows = export.sample_windows(2, seed=11)
    with torch.no_grad():
        want = model(torch.from_numpy(windows)).numpy()
    session = ort.InferenceSession(str(package.model_file))
    got = session.run(None, {session.get_inputs()[0].name: windows})[0]
    assert np.abs(want).max() > 10 and np.abs(got - want).max() < 1e-3 + 2e-5 * np.abs(want).max()
