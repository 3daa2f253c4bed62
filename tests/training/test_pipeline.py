"""simulate -> train -> export -> evaluate on a tiny data set, through the real commands."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from service.modelpkg.manifest import file_sha256, load_package
from service.science.physics import hr_map
from training import evaluate, export, simulate, train
from training.data import read_split, window_middles

TINY = ["--stages", "1", "--channels", "4", "--res-blocks", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    assert (
        simulate.main(["--out", str(root), "--trajectories", "10", "--seed", "3", "--split", "0.4,0.2,0.4", "--quiet"])
        == 0
    )
    return root


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--val-trajectories",
        "1",
        "--save-every",
        "1",
        "--lr",
        "1e-3",
        "--threads",
        "1",
        *TINY,
    ]
    assert train.main(args) == 0
    return out, args


def test_train_writes_resumable_checkpoints(run):
    out, args = run
    last = torch.load(out / "last.pt", weights_only=False)
    best = torch.load(out / "best.pt", weights_only=False)
    assert last["state"]["step"] == 4  # 4 training trajectories, batch 1, one epoch
    assert {"model", "optimizer", "config", "state", "command", "loss_weights"} <= set(last)
    assert last["config"]["stages"] == 1 and last["config"]["channels"] == 4
    assert "encoder.qinit" in last["model"] and last["model"]["encoder.qinit"].shape == (1089, 121)
    assert len(last["state"]["history"]) >= 1 and "val" in best
    # resume: a second epoch continues from step 4 with the stored optimizer state
    assert train.main([*args, "--epochs", "2", "--resume", str(out / "last.pt")]) == 0
    resumed = torch.load(out / "last.pt", weights_only=False)
    assert resumed["state"]["step"] == 8
    assert resumed["state"]["train_seconds"] >= last["state"]["train_seconds"]
    assert not torch.equal(resumed["model"]["head.fusion.body.0.weight"], last["model"]["head.fusion.body.0.weight"])
    # a resume that would shuffle differently is refused instead of skipping trajectories
    with pytest.raises(SystemExit, match="batch"):
        train.main([*args, "--epochs", "3", "--batch", "2", "--resume", str(out / "last.pt")])


def test_train_on_protocol_and_field_data_from_a_checkpoint(run, data, tmp_path):
    """--data takes several data sets (trajectories concatenated); --init starts from a
    checkpoint's weights with a fresh optimizer and step count and records where it came from."""
    out, _ = run
    field = tmp_path / "field"
    assert (
        simulate.main(
            [
                "--scenario",
                "field",
                "--out",
                str(field),
                "--trajectories",
                "6",
                "--seed",
                "4",
                "--split",
                "0.5,0.5,0",
                "--quiet",
            ]
        )
        == 0
    )
    tuned = tmp_path / "tuned"
    assert (
        train.main(
            [
                "--data",
                str(data),
                str(field),
                "--out",
                str(tuned),
                "--epochs",
                "1",
                "--val-trajectories",
                "1",
                "--lr",
                "1e-3",
                "--threads",
                "1",
                "--init",
                str(out / "last.pt"),
            ]
        )
        == 0
    )
    ckpt = torch.load(tuned / "last.pt", weights_only=False)
    assert ckpt["state"]["step"] == 4 + 3  # protocol and field training trajectories, one epoch
    assert ckpt["state"]["init"]["checkpoint"] == str(out / "last.pt") and ckpt["config"]["channels"] == 4
    with pytest.raises(SystemExit, match="--init and --resume"):
        train.main(
            [
                "--data",
                str(data),
                "--out",
                str(tuned),
                "--init",
                str(out / "last.pt"),
                "--resume",
                str(tuned / "last.pt"),
            ]
        )


def test_qinit_is_fitted_on_training_data(run, data):
    out, _ = run
    q = torch.load(out / "last.pt", weights_only=False)["model"]["encoder.qinit"].numpy()
    split = read_split(data, "train", progress=False)
    lr = split.frames.reshape(-1, 121)
    pinv = np.linalg.pinv(__import__("service.science.physics", fromlist=["x"]).sampling_matrix())
    assert not np.allclose(q, pinv, atol=1e-3)  # not the data-free default
    assert np.isfinite(q).all() and np.abs(lr @ q.T).max() < 1e4


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out, _ = run
    path = tmp_path_factory.mktemp("models") / "derefnet"
    assert (
        export.main(
            [
                "--checkpoint",
                str(out / "last.pt"),
                "--out",
                str(path),
                "--parity-windows",
                "4",
                "--data-command",
                "csist simulate --seed 3",
            ]
        )
        == 0
    )
    return path


def test_export_has_deformconv_dynamic_batch_and_manifest(exported):
    proto = onnx.load(str(exported / "model.onnx"))
    assert proto.opset_import[0].version == 19 or any(o.version == 19 for o in proto.opset_import)
    assert sum(n.op_type == "DeformConv" for n in proto.graph.node) == 2
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param  # symbolic batch axis
    package = load_package(exported)
    manifest, provenance = package.manifest, package.provenance
    assert manifest.schema_version == 1 and manifest.model.file == "model.onnx"
    assert manifest.model.sha256 == file_sha256(exported / "model.onnx")
    card = {**manifest.interface.model_dump(), **provenance.model_dump()}
    assert card["inputs"][0] == {
        "name": "lr",
        "shape": ["batch", 5, 11, 11],
        "dtype": "float32",
        "units": card["inputs"][0]["units"],
    }
    assert card["physics"]["psf_sigma"] == 0.5 and card["physics"]["ratio"] == 3
    assert card["export"]["max_abs_diff_vs_torch"] <= 1e-3
    assert card["training"]["steps"] >= 4 and card["data"]["commands"] == ["csist simulate --seed 3"]


def test_checkpoint_and_onnx_evaluate_alike(run, exported, data, tmp_path):
    out, _ = run
    split = read_split(data, "test", progress=False)
    r_pt, d_pt, m_pt = evaluate.evaluate(evaluate.load_predictor(out / "last.pt"), split, threshold=0.0)
    r_onnx, d_onnx, m_onnx = evaluate.evaluate(evaluate.load_predictor(exported), split, threshold=0.0)
    assert m_pt.shape == m_onnx.shape == (4, 16, 33, 33)
    np.testing.assert_allclose(m_pt, m_onnx, atol=2e-3, rtol=1e-4)
    # an untrained tiny model puts near-equal local maxima everywhere at threshold 0, so float
    # rounding may reorder a few of them; the scores still agree to 0.01 points
    for key in ("mAP", "AP05", "AP25", "count_accuracy"):
        assert r_pt[key] == pytest.approx(r_onnx[key], abs=1e-2)
    assert sum(len(d) for d in d_pt) == pytest.approx(sum(len(d) for d in d_onnx), rel=0.01)


def test_evaluate_cli_outputs(exported, data, tmp_path):
    report, dets, plots = tmp_path / "r.json", tmp_path / "d.json", tmp_path / "plots"
    assert (
        evaluate.main(
            [
                "--model",
                str(exported),
                "--data",
                str(data),
                "--split",
                "test",
                "--out",
                str(report),
                "--detections",
                str(dets),
                "--plots",
                str(plots),
                "--threshold",
                "0",
            ]
        )
        == 0
    )
    r = json.loads(report.read_text())
    assert r["frames"] == 4 * 16 and set(r["by_count"]) <= {"2", "3", "4"} and r["refine"] == "none"
    assert sum(v["frames"] for v in r["by_count"].values()) == 64
    frames = json.loads(dets.read_text())["frames"]
    assert len(frames) == 64 and frames[0]["trajectory"] == 0 and frames[0]["frame"] == 2 and frames[-1]["frame"] == 17
    assert all(f["uncertainty"] is None and f["count_confidence"] is None for f in frames)  # no fit, none
    assert len(list(plots.glob("*.png"))) == 4


def test_export_metrics_only_updates_the_provenance_of_the_same_model(exported, data, tmp_path):
    report = tmp_path / "again.json"
    assert (
        evaluate.main(
            [
                "--model",
                str(exported),
                "--data",
                str(data),
                "--split",
                "test",
                "--out",
                str(report),
                "--threshold",
                "0",
                "--refine",
                "none",
                "centroid",
            ]
        )
        == 0
    )
    folder = tmp_path / "derefnet"
    shutil.copytree(exported, folder)
    before = load_package(folder)
    assert export.main(["--metrics-only", "--out", str(folder), "--eval-report", str(report)]) == 0
    after = load_package(folder)  # the provenance's new hash is in the manifest
    assert set(after.metrics) == {"again:test:refine=none", "again:test:refine=centroid"}
    assert after.metrics["again:test:refine=none"]["mAP"] == json.loads(report.read_text())["reports"][0]["mAP"]
    assert "--metrics-only" in after.provenance.metrics_updated["command"]
    assert after.provenance.model_dump(exclude={"metrics", "metrics_updated"}) == before.provenance.model_dump(
        exclude={"metrics", "metrics_updated"}
    )
    assert after.manifest.model_dump(exclude={"provenance", "files"}) == before.manifest.model_dump(
        exclude={"provenance", "files"}
    )
    # a model file that is not the one the manifest describes is refused, and the folder left alone
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    text = (folder / "provenance.json").read_text()
    with pytest.raises(SystemExit, match="does not match the sha256"):
        export.main(["--metrics-only", "--out", str(folder), "--eval-report", str(report)])
    assert (folder / "provenance.json").read_text() == text
    with pytest.raises(SystemExit, match="eval-report"):
        export.main(["--metrics-only", "--out", str(folder)])


def test_perfect_maps_score_the_cell_centre_ceiling(data):
    """A predictor that returns the true HR maps: every count right, mAP capped by the grid."""
    split = read_split(data, "test", progress=False)
    mids = window_middles()

    def oracle(frames):
        return np.stack([[hr_map(split.targets[t][i]) for i in mids] for t in range(len(frames))])

    r, _, _ = evaluate.evaluate(oracle, split, refine="none")
    # two targets 0.3*sqrt(2) px apart can still share one 1/3-px cell: then one is lost
    assert 90 <= r["count_accuracy"] < 100
    assert r["AP25"] > 95  # a cell centre is at most sqrt(2)/6 = 0.236 px from its target
    assert 30 < r["mAP"] < 70 and r["AP05"] < 30


def test_evaluate_scores_several_refinements_of_one_inference(exported, data, tmp_path):
    report, dets = tmp_path / "r.json", tmp_path / "d.json"
    assert (
        evaluate.main(
            [
                "--model",
                str(exported),
                "--data",
                str(data),
                "--split",
                "test",
                "--limit",
                "1",
                "--refine",
                "none",
                "fit",
                "--threshold",
                "10",
                "--out",
                str(report),
                "--detections",
                str(dets),
            ]
        )
        == 0
    )
    reports = json.loads(report.read_text())["reports"]
    assert [r["refine"] for r in reports] == ["none", "fit"]
    # the detections are the last mode's (fit): with its uncertainties where it answered
    frames = json.loads(dets.read_text())["frames"]
    fitted = [f for f in frames if f["count_confidence"] is not None]
    assert fitted and all(len(f["uncertainty"]) == len(f["detections"]) for f in fitted)
    assert all(len(row) == 4 and row[0] > 0 for f in fitted for row in f["uncertainty"])
    assert reports[0]["inference_seconds"] == reports[1]["inference_seconds"]  # one inference
    assert reports[0]["frames"] == reports[1]["frames"] == 16


def test_evaluate_stream_path_is_the_service_path_and_matches_the_single_graph(exported, data, tmp_path):
    split = read_split(data, "test", progress=False)
    single = evaluate.load_predictor(exported)(split.frames)
    native = evaluate.load_predictor(exported, stream=True, plan="native-deform")
    plain = evaluate.load_predictor(exported, stream=True, plan="onnxruntime")
    assert (native.backends["head"], plain.backends["head"]) == ("native-deform", "onnxruntime:CPUExecutionProvider")
    scale = np.abs(single).max()
    for predictor in (native, plain):
        maps = predictor(split.frames)
        assert maps.shape == single.shape == (4, 16, 33, 33)
        np.testing.assert_allclose(maps, single, atol=1e-4 * scale)
    report = tmp_path / "r.json"
    assert (
        evaluate.main(
            [
                "--model",
                str(exported),
                "--data",
                str(data),
                "--split",
                "test",
                "--limit",
                "1",
                "--path",
                "stream",
                "--threshold",
                "0",
                "--out",
                str(report),
            ]
        )
        == 0
    )
    r = json.loads(report.read_text())
    assert r["path"] == "stream" and r["plan"] in ("onnxruntime", "native-deform") and r["frames"] == 16
    with pytest.raises(SystemExit, match="csist evaluate: error: model not found"):
        evaluate.load_predictor(exported.with_suffix(".pt"), stream=True)
