"""The model package's schema (service/modelpkg/manifest.py): the bundled models' folders, what
the reader refuses (the flat layout, an unknown schema_version, a changed file, a manifest that
contradicts itself) and what the one writer guarantees."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from service.engine.select import select_plan
from service.modelpkg.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    PackageError,
    PartSpec,
    Provenance,
    file_sha256,
    file_spec,
    load_package,
    read_manifest,
    write_package,
)
from service.modelpkg.model import ModelError, load_model
from service.runtime.config import DEFAULT_MODEL_PATH
from tests.service.conftest import STANDIN_INTERFACE, simulate_track, write_flat_standin, write_manifest

INT8_MODEL = DEFAULT_MODEL_PATH.with_name("derefnet-int8")
BUNDLED = [DEFAULT_MODEL_PATH, INT8_MODEL]


def copy_model(standin_model, tmp_path):
    dst = tmp_path / "derefnet"
    shutil.copytree(standin_model, dst)
    return dst


def edit_manifest(folder, change) -> None:
    raw = json.loads((folder / MANIFEST).read_text())
    change(raw)
    (folder / MANIFEST).write_text(json.dumps(raw))


@pytest.mark.parametrize("folder", BUNDLED, ids=lambda p: p.name)
def test_the_bundled_models_are_folders_whose_manifest_lists_every_file(folder):
    package = load_package(folder)
    assert package.manifest.schema_version == SCHEMA_VERSION == 1
    assert package.directory == folder and package.manifest_path == folder / MANIFEST
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert on_disk == sorted([MANIFEST, *(f.file for f in package.manifest.files)])  # nothing more, nothing less
    for f in package.manifest.files:
        assert file_sha256(folder / f.file) == f.sha256 and (folder / f.file).stat().st_size == f.bytes
    assert package.manifest.model.file == "model.onnx" and package.parts["head"].file == "head.onnx"
    assert [s.file for s in package.head_split.segments] == [f"head.seg{i}.onnx" for i in range(3)]
    assert package.head_split.weights.file == "head.deform.npz" and package.head_split.part == "head.onnx"
    check = package.provenance.plans["head_split"]["check"]  # the split's check, recorded by csist split-head
    assert check["relative_diff"]["segments_vs_head"] <= check["tolerance_relative"] == 1e-4
    assert package.provenance.export["command"].startswith("csist export")
    assert package.metrics and all("mAP" in report for report in package.metrics.values())


def test_the_bundled_model_loads_from_its_folder_and_its_int8_variant_names_its_source():
    model = load_model(DEFAULT_MODEL_PATH, threads=1)
    assert model.path == DEFAULT_MODEL_PATH / "model.onnx" and model.has_parts
    assert set(model.card.parts) == {"encoder", "head", "align", "fuse"}
    amx = model.card.amx_split
    assert {s.file.split("/")[0] for s in amx.encoder.segments if s} == {"amx"}
    assert amx.encoder.weights.file == "amx/encoder.weights.npz" and amx.encoder.part == "encoder.onnx"
    windows = np.stack([simulate_track(5, seed=s, spread=0.3) for s in range(2)]).astype(np.float32)
    assert model.run(windows).shape == (2, 33, 33) and model.run(windows).max() > 70.0
    int8 = load_package(INT8_MODEL)
    assert int8.manifest.quantized_from.package == "../derefnet"
    assert int8.manifest.quantized_from.sha256 == model.sha256
    assert int8.version == "0.1.0+int8" and "derefnet-int8" not in json.dumps(int8.manifest.model_dump())


def test_a_flat_model_is_refused_naming_the_migration_command(standin_model, tmp_path):
    flat = write_flat_standin(standin_model, tmp_path / "models")
    command = f"csist migrate-model {flat} --out {tmp_path / 'models' / 'derefnet'}"
    for path in (flat, flat.with_suffix(".json"), flat.parent):  # the .onnx, its card, their folder
        with pytest.raises(ModelError) as info:
            load_model(path)
        assert "old flat layout" in str(info.value) and command in str(info.value)
    with pytest.raises(ModelError, match="csist migrate-model"):  # the service's start-up: the plan choice
        select_plan(flat)


def test_an_old_path_to_a_migrated_model_points_at_its_folder(standin_model, tmp_path):
    folder = copy_model(standin_model, tmp_path)
    with pytest.raises(ModelError, match=f"model not found: {tmp_path / 'derefnet.onnx'} .*the folder {folder} now"):
        load_model(tmp_path / "derefnet.onnx")
    with pytest.raises(ModelError, match="is a file of the model folder .*point at the folder"):
        load_model(folder / "model.onnx")


def test_an_unknown_schema_version_is_refused_naming_the_supported_one(standin_model, tmp_path):
    folder = copy_model(standin_model, tmp_path)
    edit_manifest(folder, lambda raw: raw.update(schema_version=2))
    with pytest.raises(ModelError, match="schema_version 2 is not supported; this csist reads schema_version 1"):
        load_model(folder)
    edit_manifest(folder, lambda raw: raw.pop("schema_version"))
    with pytest.raises(ModelError, match="has no schema_version"):
        load_model(folder)


def test_a_changed_provenance_is_refused(standin_model, tmp_path):
    folder = copy_model(standin_model, tmp_path)
    raw = json.loads((folder / "provenance.json").read_text())
    raw["metrics"]["cso_map"] = 99.0  # better numbers, by hand
    (folder / "provenance.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="SHA-256 mismatch: provenance .*provenance.json"):
        load_model(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw["model"].update(sha256="xyz"), "model.sha256: String should match pattern"),
        (lambda raw: raw["model"].update(file="../model.onnx"), "model.file: .*a relative path inside the model"),
        (lambda raw: raw["interface"].update(inputz=[]), "interface.inputz: Extra inputs are not permitted"),
        (lambda raw: raw.pop("interface"), "interface: Field required"),
        (
            lambda raw: raw["files"].pop(),
            "files: .*not the files the manifest names: provenance.json is named but not listed",
        ),
        (lambda raw: raw["files"][0].update(sha256="0" * 64), "files: .*model.onnx is listed with another sha256"),
    ],
)
def test_an_invalid_manifest_is_refused_naming_the_field(standin_model, tmp_path, change, message):
    folder = copy_model(standin_model, tmp_path)
    edit_manifest(folder, change)
    with pytest.raises(PackageError, match=message):
        read_manifest(folder / MANIFEST)
    with pytest.raises(ModelError, match=f"manifest {folder / MANIFEST} is invalid: {message}"):
        load_model(folder)


def test_unreadable_json_is_named(standin_model, tmp_path):
    folder = copy_model(standin_model, tmp_path)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ModelError, match="manifest .* is not readable JSON"):
        load_model(folder)


def test_physics_and_postprocess_keep_extra_keys(standin_model, tmp_path):
    """Calibration settings are added there (PSF width, saturation, brightness range): the schema
    keeps any key, and the service shows them in the metadata."""
    folder = copy_model(standin_model, tmp_path)
    physics = {**STANDIN_INTERFACE["physics"], "psf_sigma": 0.55, "saturation": 255.0}
    postprocess = {**STANDIN_INTERFACE["postprocess"], "brightness_range": [60.0, 250.0]}
    write_manifest(folder, physics=physics, postprocess=postprocess)
    package = load_model(folder).card
    assert package.physics.model_dump() == physics and package.physics.psf_sigma == 0.55
    assert package.postprocess.model_dump()["brightness_range"] == [60.0, 250.0]


def test_provenance_numbers_that_json_cannot_hold_read_as_null(standin_model, tmp_path):
    folder = copy_model(standin_model, tmp_path)
    package = load_package(folder)
    write_package(folder, package.manifest, Provenance(metrics={"cso_map": float("nan"), "ap05": 1.0}))
    assert load_package(folder).metrics == {"cso_map": None, "ap05": 1.0}  # NaN would break JSON answers


def test_the_writer_lists_what_is_there_and_removes_what_it_no_longer_lists(standin_model, tmp_path):
    folder = copy_model(standin_model, tmp_path)
    package = load_package(folder)
    assert [(f.file, f.bytes) for f in package.manifest.files] == [
        ("model.onnx", (folder / "model.onnx").stat().st_size),
        ("provenance.json", (folder / "provenance.json").stat().st_size),
    ]
    (folder / "extra").mkdir()
    shutil.copyfile(folder / "model.onnx", folder / "extra" / "encoder.onnx")
    tensors = {"inputs": [{"name": "lr_frames", "shape": ["n", 11, 11]}], "outputs": [{"name": "f", "shape": ["n", 9]}]}
    part = file_spec(folder, "extra/encoder.onnx", PartSpec, **tensors)
    wrong = part.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(PackageError, match="SHA-256 mismatch: model file .*encoder.onnx"):
        write_package(folder, package.manifest.model_copy(update={"parts": {"encoder": wrong}}))
    assert load_package(folder).manifest == package.manifest  # nothing was written
    written = write_package(folder, package.manifest.model_copy(update={"parts": {"encoder": part}}))
    assert [f.file for f in written.files] == ["extra/encoder.onnx", "model.onnx", "provenance.json"]
    assert load_package(folder).manifest == written
    write_package(folder, package.manifest)  # the part dropped: its file and its emptied folder go
    assert not (folder / "extra").exists() and (folder / "model.onnx").is_file()
    assert load_package(folder).manifest == package.manifest
