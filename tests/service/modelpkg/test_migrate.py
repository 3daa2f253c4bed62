"""``csist migrate-model``: a model of the flat layout (``<stem>.onnx`` + its card ``<stem>.json``)
into a model folder that loads and answers as the flat model did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from csist import cli
from service.modelpkg import migrate
from service.modelpkg.manifest import PackageError, file_sha256, load_package
from service.modelpkg.model import load_model
from service.runtime.config import DEFAULT_MODEL_PATH
from tests.service.conftest import CARD_METRICS, STANDIN_INTERFACE, simulate_track, write_flat_standin


def test_a_migrated_flat_model_loads_and_answers_as_before(standin_model, tmp_path):
    flat = write_flat_standin(standin_model, tmp_path)
    card = json.loads(flat.with_suffix(".json").read_text())
    package = migrate.migrate(flat)
    assert package.directory == tmp_path / "derefnet"  # the default: the .onnx path without .onnx
    assert sorted(p.name for p in package.directory.iterdir()) == ["manifest.json", "model.onnx", "provenance.json"]
    manifest = package.manifest
    assert (manifest.name, manifest.version, manifest.model.sha256) == ("derefnet", "0.1.0", card["sha256"])
    assert manifest.interface.model_dump(mode="json", exclude_none=True) == STANDIN_INTERFACE
    assert package.metrics == CARD_METRICS and package.provenance.training == {"note": "stand-in for tests"}
    assert package.provenance.migrated["from"] == "derefnet.onnx + derefnet.json (flat layout)"
    assert flat.is_file() and flat.with_suffix(".json").is_file()  # copied, not moved
    windows = np.stack([simulate_track(5, seed=s) for s in range(3)]).astype(np.float32)
    want = ort.InferenceSession(str(flat), providers=["CPUExecutionProvider"]).run(["hr"], {"lr": windows})[0]
    np.testing.assert_array_equal(load_model(package.directory).run(windows), want)


def test_the_command_moves_the_files_and_refuses_to_overwrite_a_model(standin_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["migrate-model", "--help"])
    assert info.value.code == 0 and "csist migrate-model" in capsys.readouterr().out
    cli.main(["--help"])
    assert "migrate-model" in capsys.readouterr().out
    flat = write_flat_standin(standin_model, tmp_path / "flat")
    other = Path(shutil.copy(flat, tmp_path / "flat" / "other.onnx"))  # another model's file stays
    out = tmp_path / "models" / "standin"
    assert cli.main(["migrate-model", str(flat), "--out", str(out), "--move"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["other.onnx"] and other.is_file()
    assert load_model(out).sha256 == file_sha256(other)
    assert load_package(out).provenance.migrated["command"] == f"csist migrate-model {flat} --out {out} --move"
    again = write_flat_standin(standin_model, tmp_path / "flat")
    with pytest.raises(SystemExit, match="already holds a model"):
        cli.main(["migrate-model", str(again), "--out", str(out)])


def test_a_flat_model_whose_files_do_not_match_its_card_is_not_migrated(standin_model, tmp_path):
    flat = write_flat_standin(standin_model, tmp_path)
    with open(flat, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(PackageError, match=f"SHA-256 mismatch: {flat} .*not migrated"):
        migrate.migrate(flat, move=True)
    assert not (tmp_path / "derefnet").exists() and flat.is_file()
    flat.unlink()
    with pytest.raises(PackageError, match="is listed in .* but not there"):
        migrate.migrate(flat)
    with pytest.raises(PackageError, match="not a card of the flat layout"):
        migrate.migrate(DEFAULT_MODEL_PATH / "manifest.json")


def test_an_int8_card_gets_its_source_folder_and_keeps_a_shared_float32_head(standin_model, tmp_path):
    """An int8 model quantized without --head named the float32 head file beside it: the folder
    gets its own copy, and --move leaves the float32 model's file where it was."""
    fp32 = write_flat_standin(standin_model, tmp_path)
    int8 = write_flat_standin(standin_model, tmp_path, "derefnet-int8")
    shutil.copyfile(fp32, tmp_path / "derefnet.head.onnx")  # a stand-in for the shared head
    card = json.loads(int8.with_suffix(".json").read_text())
    tensors = {"inputs": [{"name": "features", "shape": ["batch", 5, 1089]}], "outputs": [{"name": "hr", "shape": []}]}
    card["parts"] = {"head": {"file": "derefnet.head.onnx", "sha256": file_sha256(fp32), **tensors}}
    card["quantization"] = {"source": {"file": "derefnet.onnx", "sha256": card["sha256"], "card": "derefnet.json"}}
    card["version"] = "0.1.0+int8"
    int8.with_suffix(".json").write_text(json.dumps(card))
    package = migrate.migrate(int8, move=True)
    assert package.directory == tmp_path / "derefnet-int8"
    assert package.manifest.quantized_from.model_dump() == {"package": "../derefnet", "sha256": card["sha256"]}
    assert package.parts["head"].file == "head.onnx" and (package.directory / "head.onnx").is_file()
    assert package.provenance.quantization["source"]["card"] == "derefnet.json"  # the record, as made
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "derefnet.head.onnx",
        "derefnet.json",
        "derefnet.onnx",
    ]


def flatten(folder, directory, legacy_head_split: bool = False):
    """A model folder written back in the flat layout (files named after the stem ``derefnet``,
    one card holding manifest and provenance); ``legacy_head_split``: the head split in the
    older deform-only format (head / head_sha256 / deform)."""
    package = load_package(folder)
    m, provenance = package.manifest, package.provenance.model_dump(mode="json", exclude_none=True)
    directory.mkdir(parents=True)

    def put(file, name):
        shutil.copyfile(folder / file, directory / name)
        return name

    def dump(spec):
        return spec.model_dump(mode="json", exclude_none=True)

    parts = {p.file: f"derefnet.{name}.onnx" for name, p in m.parts.items()}

    def split(spec, tag, weights):
        entry = dump(spec)
        entry["part"] = parts[spec.part]
        entry["segments"] = [
            None if s is None else {**s, "file": put(s["file"], f"derefnet.{tag}.seg{i}.onnx")}
            for i, s in enumerate(entry["segments"])
        ]
        entry["weights"] = {**entry["weights"], "file": put(spec.weights.file, f"derefnet.{tag}.{weights}.npz")}
        return entry

    card = {
        "name": m.name,
        "version": m.version,
        "file": put(m.model.file, "derefnet.onnx"),
        "sha256": m.model.sha256,
        "bytes": m.model.bytes,
        **dump(m.interface),
        "parts": {name: {**dump(p), "file": put(p.file, parts[p.file])} for name, p in m.parts.items()},
        **{k: v for k, v in provenance.items() if k != "plans"},
    }
    head = {**split(m.plans.head_split, "head", "deform"), **provenance["plans"]["head_split"]}
    if legacy_head_split:
        head["head"], head["head_sha256"] = head.pop("part"), head.pop("part_sha256")
        head["deform"] = [
            {"input": s["inputs"][0], "offset": s["inputs"][1], **{k: s[k] for k in ("output", "weight", "bias")}}
            for s in head.pop("steps")
        ]
    card["head_split"] = head
    amx = m.plans.amx_split
    card["amx_split"] = {
        "precision": amx.precision,
        **{name: split(getattr(amx, name), f"amx.{name}", "weights") for name in ("encoder", "head", "align", "fuse")},
        **provenance["plans"]["amx_split"],
    }
    (directory / "derefnet.json").write_text(json.dumps(card, indent=2))
    return directory / "derefnet.onnx"


def test_the_bundled_model_round_trips_through_the_flat_layout(tmp_path):
    """Parts, the head split (also in its older format) and the AMX split get the folder's names
    and keep their hashes, steps and checks: the manifest migrated from the flat layout is the
    bundled one."""
    bundled = load_package(DEFAULT_MODEL_PATH)
    flat = flatten(DEFAULT_MODEL_PATH, tmp_path / "flat", legacy_head_split=True)
    package = migrate.migrate(flat, tmp_path / "derefnet")

    def model_files(manifest):  # the provenance (so its hash) records this migration: all else is equal
        files = [f.model_dump() for f in manifest.files if f.file != "provenance.json"]
        return manifest.model_dump(exclude={"provenance"}) | {"files": files}

    assert model_files(package.manifest) == model_files(bundled.manifest)
    assert package.manifest.plans.amx_split.head.steps == bundled.manifest.plans.amx_split.head.steps
    skip = {"migrated"}
    assert package.provenance.model_dump(exclude=skip) == bundled.provenance.model_dump(exclude=skip)
    for f in (f for f in package.manifest.files if f.file != "provenance.json"):
        assert file_sha256(package.directory / f.file) == file_sha256(DEFAULT_MODEL_PATH / f.file)
