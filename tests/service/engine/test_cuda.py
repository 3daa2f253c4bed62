"""The CUDA plan on a GPU host (ONNX Runtime's CUDA execution provider, the gpu extra): the same
maps as the float32 CPU reference, chosen by ``auto`` when it is faster, served end to end.
Skipped where ONNX Runtime has no CUDAExecutionProvider or no GPU answers."""

from __future__ import annotations

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.engine.plans import PlanOptions, build_plan
from service.engine.select import probe_windows, relative_error, select_plan
from service.runtime.config import DEFAULT_MODEL_PATH, Settings
from tests.service.conftest import LiveServer, simulate_track

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="no CUDAExecutionProvider (install the gpu extra on a host with an NVIDIA GPU)",
    ),
    pytest.mark.skipif(not (DEFAULT_MODEL_PATH / "manifest.json").is_file(), reason="models/derefnet not exported yet"),
]
GPU = PlanOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


def test_cuda_plan_runs_on_the_gpu_and_matches_the_cpu_reference():
    plan = build_plan("cuda", DEFAULT_MODEL_PATH, options=GPU)
    assert plan.model.providers[0] == "CUDAExecutionProvider"
    assert set(plan.backends().values()) == {"onnxruntime:CUDAExecutionProvider"}
    cpu = build_plan("onnxruntime", DEFAULT_MODEL_PATH, options=PlanOptions(threads=1))
    windows = probe_windows(64)
    assert relative_error(plan.run(windows), cpu.run(windows)) < 5e-3
    b = len(windows)
    feats = plan.encode(windows.reshape(b * 5, 11, 11)).reshape(b, 5, -1)
    assert relative_error(plan.head(feats), cpu.run(windows)) < 5e-3


def test_auto_on_a_gpu_host_checks_the_cuda_plan():
    sel = select_plan(DEFAULT_MODEL_PATH, options=GPU, budget_s=4.0)
    rows = {r["plan"]: r for r in sel.report()["candidates"]}
    assert rows["cuda"]["status"] in ("chosen", "passed")
    assert rows["cuda"]["max_rel_error"] < 5e-3


def test_server_on_the_cuda_plan_answers():
    live = LiveServer(Settings(model_path=DEFAULT_MODEL_PATH, plan="cuda", drain_s=0.0)).start()
    try:
        frames = simulate_track(5, seed=0, spread=0.3)
        with httpx.Client(base_url=live.base_url, timeout=60) as c:
            r = c.post("/unmix", json={"frames": [{"patch": f.tolist()} for f in frames]})
            meta = c.get("/v2/models/derefnet").json()
    finally:
        live.stop()
    assert r.status_code == 200, r.text
    assert meta["plan"]["name"] == "cuda" and meta["providers"][0] == "CUDAExecutionProvider"
    assert sum(len(x["targets"]) for x in r.json()["results"]) > 0
    assert np.isfinite([t["x"] for x in r.json()["results"] for t in x["targets"]]).all()
