"""Model loading and verification from the model folder, settings, JSON logs (the manifest's schema
and the migration from the flat layout: test_manifest.py, test_migrate.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from service.engine.host import has_vnni
from service.modelpkg.manifest import file_sha256
from service.modelpkg.model import ModelError, load_model, resolve_providers
from service.runtime.config import DEFAULT_MODEL_PATH, Settings, available_cpus
from service.runtime.logs import JsonFormatter, configure_logging
from tests.service.conftest import CARD_METRICS, simulate_track, write_manifest


def copy_model(standin_model, tmp_path):
    dst = tmp_path / "derefnet"
    shutil.copytree(standin_model, dst)
    return dst


def test_loads_verifies_and_runs(standin_model, reference_session):
    model = load_model(standin_model)
    assert model.sha256 == file_sha256(standin_model / "model.onnx")
    assert model.path == standin_model / "model.onnx"
    assert load_model(standin_model / "manifest.json").sha256 == model.sha256  # the manifest's path works too
    assert model.providers == ["CPUExecutionProvider"]  # no CUDA on this machine
    assert model.card.name == "derefnet" and model.card.metrics == CARD_METRICS
    x = np.random.default_rng(0).uniform(0, 255, size=(3, 5, 11, 11)).astype(np.float32)
    np.testing.assert_array_equal(model.run(x), reference_session.run(["hr"], {"lr": x})[0])
    model.warmup((1, 4))


def test_a_changed_model_file_is_refused_naming_both_hashes(standin_model, tmp_path):
    path = copy_model(standin_model, tmp_path)
    listed = file_sha256(path / "model.onnx")
    with open(path / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="SHA-256 mismatch") as info:
        load_model(path)
    assert file_sha256(path / "model.onnx") in str(info.value) and listed in str(info.value)
    assert str(path / "manifest.json") in str(info.value)


def test_missing_folder_manifest_or_file(standin_model, tmp_path):
    with pytest.raises(ModelError, match="model not found: .*nope.*point CSIST_MODEL_PATH"):
        load_model(tmp_path / "nope")
    path = copy_model(standin_model, tmp_path)
    (path / "model.onnx").unlink()
    with pytest.raises(ModelError, match="model file not found: .*model.onnx"):
        load_model(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ModelError, match="no manifest.json in"):
        load_model(path)


def test_the_interface_must_match(standin_model, tmp_path):
    path = copy_model(standin_model, tmp_path)
    write_manifest(path, inputs=[{"name": "lr", "shape": ["batch", 3, 11, 11], "dtype": "float32"}])
    with pytest.raises(ModelError, match="input shape"):
        load_model(path)
    write_manifest(path, inputs=[{"name": "frames", "shape": ["batch", 5, 11, 11], "dtype": "float32"}])
    with pytest.raises(ModelError, match="the manifest says 'frames'"):
        load_model(path)
    write_manifest(path, postprocess={"threshold": 70.0, "refine": "magic"})
    with pytest.raises(ModelError, match="interface.postprocess.refine='magic'"):
        load_model(path)


def test_resolve_providers():
    available = ort.get_available_providers()
    auto = resolve_providers(None)
    assert auto[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in auto) == ("CUDAExecutionProvider" in available)
    assert resolve_providers(["NoSuchProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["NoSuchProvider"]) == ["CPUExecutionProvider"]


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CSIST_MODEL_PATH", str(tmp_path / "m"))
    monkeypatch.setenv("CSIST_MAX_BATCH_SIZE", "128")
    monkeypatch.setenv("CSIST_MAX_BATCH_WAIT_MS", "5.5")
    monkeypatch.setenv("CSIST_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("CSIST_API_TOKEN", "s3cret")
    monkeypatch.setenv("CSIST_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CSIST_TRACK_TTL_S", "2.5")
    s = Settings()
    assert s.model_path == tmp_path / "m"
    assert (s.max_batch_size, s.max_batch_wait_ms, s.track_ttl_s) == (128, 5.5, 2.5)
    assert s.provider_list() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert s.api_token.get_secret_value() == "s3cret"
    assert s.log_level == "debug"
    monkeypatch.setenv("CSIST_API_TOKEN", "")
    monkeypatch.setenv("CSIST_PROVIDERS", "auto")
    s = Settings()
    assert s.api_token is None and s.provider_list() is None
    monkeypatch.setenv("CSIST_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="max_batch_size"):
        Settings()


def test_parallelism_defaults_to_one_single_threaded_worker_per_core(monkeypatch):
    cores = available_cpus()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    s = Settings()
    assert s.parallelism(cuda=False) == (cores, 1 if cores > 1 else 0)
    assert s.parallelism(cuda=True) == (1, 0)  # a GPU takes one call at a time
    monkeypatch.setenv("CSIST_INFERENCE_WORKERS", "3")
    assert Settings().parallelism(cuda=True) == (3, 1)
    monkeypatch.setenv("CSIST_THREADS", "2")
    assert Settings().parallelism(cuda=False) == (3, 2)  # explicit threads are kept
    monkeypatch.setenv("CSIST_INFERENCE_WORKERS", "1")
    monkeypatch.setenv("CSIST_THREADS", "0")
    assert Settings().parallelism(cuda=False) == (1, 0)  # one worker: ONNX Runtime's own threads
    monkeypatch.setenv("CSIST_INFERENCE_WORKERS", "-1")
    with pytest.raises(ValueError, match="inference_workers"):
        Settings()
    monkeypatch.delattr(os, "sched_getaffinity")  # not on macOS or Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert 1 <= available_cpus() <= 3


def test_json_logs():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", stream=stream)
        logging.getLogger("csist.test").info("hello %s", "world", extra={"route": "/unmix"})
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("uvicorn.error").exception("failed")
        logging.getLogger("csist.test").debug("hidden")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[0]["message"] == "hello world" and lines[0]["route"] == "/unmix"
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "csist.test"
    assert lines[0]["ts"].endswith("+00:00")
    assert lines[1]["level"] == "error" and "ValueError: bad" in lines[1]["exc"]
    assert JsonFormatter().format(logging.makeLogRecord({"msg": "x", "obj": object()}))


def test_card_peak_mode_is_checked_and_used(standin_model, tmp_path):
    from service.api.answers import peak_options
    from service.engine.batcher import Batcher, PeakOptions
    from service.engine.plans import FunctionPlan
    from service.runtime.lifecycle import Runtime
    from service.runtime.metrics import Metrics
    from service.science.peaks import extract_peaks
    from service.science.physics import DEFAULT_SNR

    path = copy_model(standin_model, tmp_path)
    write_manifest(path, postprocess={"threshold": 30.0, "refine": "centroid", "mode": "bogus"})
    with pytest.raises(ModelError, match="postprocess.mode"):
        load_model(path)
    write_manifest(path, postprocess={"threshold": 30.0, "refine": "none", "mode": "local_max"})
    model = load_model(path)
    assert model.card.postprocess.mode == "local_max"
    # two adjacent cells above the threshold: "cells" keeps both, "local_max" only the higher
    hr = np.zeros((33, 33))
    hr[10, 10], hr[10, 11] = 200.0, 150.0
    assert len(extract_peaks(hr, 70.0, "none", mode="cells")) == 2
    assert len(extract_peaks(hr, 70.0, "none", mode="local_max")) == 1
    runtime = Runtime(Settings(model_path=path, threshold_snr=""), Metrics(), model=model)
    assert peak_options(runtime, None) == PeakOptions(30.0, "none", None, 3, "local_max")
    # by default the threshold is relative to each window's noise; the manifest's is then unused
    relative = Runtime(Settings(model_path=path), Metrics(), model=model)
    assert peak_options(relative, None) == PeakOptions(30.0, "none", None, 3, "local_max", snr=DEFAULT_SNR)

    def adjacent_cells(windows):
        out = np.zeros((len(windows), 33, 33), dtype=np.float32)
        out[:, 10, 10], out[:, 10, 11] = 200.0, 150.0
        return out

    async def run_both():
        b = Batcher(FunctionPlan(adjacent_cells), Metrics(), max_batch=8, max_wait_s=0.01)
        b.start()
        w = np.zeros((1, 5, 11, 11), dtype=np.float32)
        got = await asyncio.gather(
            b.submit(w, PeakOptions(70.0, "none")),
            b.submit(w, peak_options(runtime, None)),
        )
        await b.stop()
        return [len(r.peaks[0]) for r in got]

    assert asyncio.run(run_both()) == [2, 1]  # default rule "cells", the manifest's "local_max"


INT8_MODEL = DEFAULT_MODEL_PATH.with_name("derefnet-int8")


@pytest.mark.skipif(
    not ((INT8_MODEL / "manifest.json").is_file() and (DEFAULT_MODEL_PATH / "manifest.json").is_file()),
    reason="models/derefnet-int8 not made yet (csist quantize)",
)
@pytest.mark.skipif(
    not has_vnni(),
    reason="the CPU has no VNNI (AVX-512 VNNI or AVX-VNNI): ONNX Runtime's u8s8 int8 kernels saturate"
    " without it, and the service refuses the int8 model there (tests/service/engine/test_select.py)",
)
def test_bundled_int8_variant_verifies_and_stays_close_to_fp32():
    """``CSIST_MODEL_PATH=models/derefnet-int8``: every hash checks, both paths run, and the maps
    stay within a few % of the fp32 model's peak (the CSO-mAP gate is in its provenance)."""
    int8, fp32 = load_model(INT8_MODEL), load_model(DEFAULT_MODEL_PATH)
    assert int8.has_parts and int8.card.name == fp32.card.name
    assert int8.card.version.endswith("+int8") and int8.sha256 != fp32.sha256
    windows = np.stack([simulate_track(5, seed=s, spread=0.3) for s in range(4)]).astype(np.float32)
    want = fp32.run(windows)
    peak = np.abs(want).max()
    assert peak > 70.0  # real targets, above the card's threshold
    parts = int8.head(int8.encode(windows.reshape(-1, 11, 11)).reshape(4, 5, -1))
    for got in (int8.run(windows), parts):
        assert np.abs(got - want).max() < 0.05 * peak and np.abs(got - want).mean() < 0.005 * peak


def test_split_step_specs_are_validated():
    """An Attention step names its four other weights and has no kernel or activation; a Conv
    step names its kernel; the clip bounds go with the soft threshold."""
    from pydantic import ValidationError

    from service.modelpkg.manifest import StepSpec

    extra = {"nb_weight": "w_nb", "nb_bias": "b_nb", "mix_weight": "w_mix", "mix_bias": "b_mix"}
    ok = StepSpec(op="Attention", inputs=["mid", "nb"], output="y", weight="w", bias="b", extra=extra)
    assert ok.extra == extra
    for bad in (
        {"extra": {k: v for k, v in extra.items() if k != "mix_bias"}},
        {"extra": None},
        {"extra": extra, "kernel": "amx"},
        {"extra": extra, "inputs": ["mid"]},
    ):
        with pytest.raises(ValidationError):
            StepSpec(**{"op": "Attention", "inputs": ["mid", "nb"], "output": "y", "weight": "w", "bias": "b", **bad})
    conv = {"op": "Conv", "output": "y", "weight": "w", "bias": "b", "kernel": "amx"}
    assert StepSpec(**conv, inputs=["x", "r"], residual=True).residual
    with pytest.raises(ValidationError, match="takes 2 inputs"):  # the residual is the second
        StepSpec(**conv, inputs=["x"], residual=True)
    with pytest.raises(ValidationError, match="only a Conv step"):
        StepSpec(op="DeformConv", inputs=["x", "o"], output="y", weight="w", bias="b", residual=True)
    with pytest.raises(ValidationError, match="names its kernel"):
        StepSpec(op="Conv", inputs=["x"], output="y", weight="w", bias="b")
    with pytest.raises(ValidationError, match="lo must not exceed hi"):
        StepSpec(
            op="Conv",
            inputs=["x"],
            output="y",
            weight="w",
            bias="b",
            kernel="amx",
            activation="soft_threshold",
            clip=[1.0, -1.0],
        )
